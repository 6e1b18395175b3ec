"""Bad input everywhere: the functional ops, the blocks, the models, convert() / fold_bn() and
`python -m fusedres`, fed wrong ranks, channel counts, dtypes and devices, odd strides and
layouts, empty batches, huge shapes, NaN and Inf.

Everything is one table, CASES: where, what input, and the outcome. An invalid input raises a
clear error naming the argument before any kernel runs (the row gives the error and a part
of its message, matched literally); a valid one matches the unfused PyTorch computation or
torchvision, NaN and Inf where PyTorch puts them. Each row runs on the backends it lists
(cpp, reference, and triton under the interpreter). The table is also tests/BAD_INPUT.md,
for the README's troubleshooting section; `python tests/test_bad_input.py` rewrites it and a
test checks that it is current.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import has_layout, make, randomize_bn
from torch import nn

import fusedres
import fusedres.functional as FF

ALL = ("cpp", "reference", "triton")
NATIVE = ("cpp", "reference")  # rows too slow for the Triton interpreter (whole models)
ANY = ("auto",)  # rows that do not depend on the backend
MARKDOWN = Path(__file__).with_name("BAD_INPUT.md")
README = Path(__file__).parent.parent / "README.md"
# The README's troubleshooting section holds the same table between these markers.
README_BEGIN, README_END = "<!-- bad-input table: tests/test_bad_input.py -->", "<!-- end -->"

C = 4  # channels of the op-level inputs
D = torch.float64  # dtype of the whole-model comparisons
NAN, INF = float("nan"), float("inf")
CL = torch.channels_last


@dataclass
class Case:
    where: str
    input: str
    outcome: str  # as shown in the table
    calls: list  # raising rows: each call must raise; matching rows: each returns pairs
    error: type | None = None  # raising rows: the exception and a literal part of its text
    message: str = ""
    backends: tuple = ALL
    tolerance: dict = field(default_factory=dict)


def raises(where, input, error, message, *calls, backends=ALL, shown=None, text=None):
    """Each call raises `error` whose message contains `message`; the table shows `shown`
    (default: the error's name) and `text` (default: `message`)."""
    return Case(where, input, f"{shown or error.__name__}: {text or message}", list(calls),
                error, message, backends)


def matches(where, input, outcome, *calls, backends=ALL, **tolerance):
    """calls return [(got, expected), ...] (or None after checking by themselves)."""
    return Case(where, input, outcome, list(calls), backends=backends, tolerance=tolerance)


# ---- inputs -------------------------------------------------------------------------------------


def x4(*shape, **kwargs):
    return make(shape or (2, C, 3, 3), **kwargs)


def bn_params(dtype=torch.float32, channels=C):
    """running_mean, running_var, weight, bias (fresh, non-trivial)."""
    return {"running_mean": torch.randn(channels).to(dtype),
            "running_var": (torch.rand(channels) + 0.5).to(dtype),
            "weight": (torch.rand(channels) + 0.5).to(dtype),
            "bias": torch.randn(channels).to(dtype)}


def with_nan(t, *index, value=NAN):
    t = t.clone()
    t[index] = value
    return t


def expanded(shape, dim, dtype=torch.float32):
    """A tensor of `shape` whose dimension `dim` is a stride-0 broadcast."""
    base_shape = list(shape)
    base_shape[dim] = 1
    return make(tuple(base_shape), dtype=dtype).expand(*shape)


def overlapping(shape, strides):
    """A view of `shape` whose elements overlap in memory (as_strided)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    return make((size,)).as_strided(shape, strides)


def bn_vs_torch(x, residual=None, training=True, params=None, layout=None):
    """The fused op and F.batch_norm (+ residual) + ReLU on clones of the same statistics:
    [(out, ref), (running_mean, ref), (running_var, ref)]."""
    p = params or bn_params()
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    if residual is None:
        out = FF.batch_norm_relu(x, **p, training=training)
    else:
        out = FF.batch_norm_add_relu(x, residual, **p, training=training)
    ref = F.batch_norm(x, rm, rv, p["weight"], p["bias"], training)
    ref = torch.relu(ref + residual if residual is not None else ref)
    if layout is not None:
        assert has_layout(out, layout), f"output is not {layout}: strides {out.stride()}"
    return [(out, ref), (p["running_mean"], rm), (p["running_var"], rv)]


def add_bn_vs_torch(x, z, training=True):
    """add_batch_norm_relu and x + z, then F.batch_norm + ReLU, on clones of the same
    statistics: [(sum, ref), (out, ref), (running_mean, ref), (running_var, ref)]."""
    p = bn_params()
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    total, out = FF.add_batch_norm_relu(x, z, **p, training=training)
    ref_total = x + z
    ref = torch.relu(F.batch_norm(ref_total, rm, rv, p["weight"], p["bias"], training))
    return [(total, ref_total), (out, ref), (p["running_mean"], rm), (p["running_var"], rv)]


def nan_channel_training(value):
    """A NaN / Inf in channel 2 of a training batch: that channel's output and running_var are
    NaN, its running_mean NaN / Inf, the other channels untouched (as F.batch_norm)."""
    x = with_nan(x4(), 1, 2, 0, 1, value=value)
    pairs = bn_vs_torch(x)
    (out, _), (rm, _), (rv, _) = pairs
    others = [0, 1, 3]
    assert out[:, 2].isnan().all() and not out[:, others].isnan().any()
    assert not rm[2].isfinite() and rv[2].isnan() and rm[others].isfinite().all()
    return pairs


def dual_vs_torch(x, z, training=True):
    p, q = bn_params(), bn_params()
    ref_p = {k: v.clone() for k, v in p.items()}
    ref_q = {k: v.clone() for k, v in q.items()}
    out = FF.dual_batch_norm_add_relu(x, z, p["running_mean"], p["running_var"],
                                      q["running_mean"], q["running_var"], p["weight"],
                                      p["bias"], q["weight"], q["bias"], training)
    ref = torch.relu(F.batch_norm(x, **ref_p, training=training)
                     + F.batch_norm(z, **ref_q, training=training))
    return [(out, ref)] + [(p[k], ref_p[k]) for k in ("running_mean", "running_var")] + \
        [(q[k], ref_q[k]) for k in ("running_mean", "running_var")]


def conv_vs_torch(x, w, residual=None, bias=True, padding=1, layout=None):
    b = torch.randn(w.shape[0]) if bias else None
    if residual is None:
        out = FF.conv_bias_relu(x, w, b, 1, padding)
        ref = torch.relu(F.conv2d(x, w, b, 1, padding))
    else:
        out = FF.conv_bias_add_relu(x, w, b, residual, 1, padding)
        ref = torch.relu(F.conv2d(x, w, b, 1, padding) + residual)
    if layout is not None:
        assert has_layout(out, layout), f"output is not {layout}: strides {out.stride()}"
    return [(out, ref)]


def fold_with_nan():
    w, m, v = conv_w(), torch.randn(8), with_nan(torch.rand(8) + 0.5, 3)
    weight, bias = FF.fold_conv_bn(w, None, m, v, 1e-5, None, None)
    assert weight[3].isnan().all() and bias[3].isnan() and not bias[[0, 1, 2, 4]].isnan().any()
    return list(zip((weight, bias), fusedres.reference.fold_conv_bn(w, None, m, v, 1e-5, None,
                                                                     None)))


def conv_w(c_out=8, c_in=C, k=3, **kwargs):
    return make((c_out, c_in, k, k), scale=0.2, **kwargs)


def huge(fn):
    """Runs fn under FakeTensorMode: shapes and strides flow through the real Python path and
    the ops' fake kernels, and nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def call():
        with FakeTensorMode():
            fn()
    return call


def huge_bn():
    x = torch.empty(2, 2, 2**15, 2**15).to(memory_format=CL)  # 2**32 elements (16 GiB)
    assert x.numel() > 2**31
    stats = {"running_mean": torch.zeros(2), "running_var": torch.ones(2)}
    out = FF.batch_norm_add_relu(x, x, **stats, training=True)
    assert out.shape == x.shape and out.stride() == x.stride()
    out = FF.batch_norm_relu(x.contiguous(), **stats)
    assert out.stride() == x.contiguous().stride()
    assert FF.add_relu(x, x).shape == x.shape


def huge_conv():
    x = torch.empty(2, 2, 2**15, 2**15).to(memory_format=CL)
    residual = torch.empty(2, 4, 2**15, 2**15)
    out = FF.conv_bias_add_relu(x, torch.empty(4, 2, 3, 3), torch.empty(4), residual, 1, 1)
    assert out.shape == (2, 4, 2**15, 2**15) and has_layout(out, "channels_last")


# ---- blocks and models -----------------------------------------------------------------------


@functools.cache
def _torchvision_resnet18():
    import torchvision  # a dependency of fusedres
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model)
    return model


MODEL_KINDS = ("fusedres.ResNet18", "convert(resnet18)", "fold_bn(convert(resnet18))")


def model_pair(kind, train=False, channels_last=False, dtype=torch.float32):
    """(torchvision ResNet-18, a fused one with the same weights), in train or eval mode."""
    reference = copy.deepcopy(_torchvision_resnet18()).to(dtype)
    if kind == "fusedres.ResNet18":
        fused = fusedres.ResNet18(num_classes=10).to(dtype)
        fused.load_state_dict(reference.state_dict())
    else:
        fused = fusedres.convert(copy.deepcopy(reference))
        if kind.startswith("fold_bn"):
            fused = fusedres.fold_bn(fused.eval())
    for m in (reference, fused):
        m.train(train)
        if channels_last:
            m.to(memory_format=CL)
    return reference, fused


@functools.cache
def _fused_model(kind):
    return model_pair(kind)[1]


def each_model(x_fn, modes=(True, False), kinds=MODEL_KINDS):
    """One call per (model, mode): feeds x_fn() to the fused model (for raising rows, which
    share one model of each kind)."""
    def call(kind, train):
        return _fused_model(kind).train(train)(x_fn())
    return [functools.partial(call, kind, train) for kind in kinds for train in modes
            if not (train and kind.startswith("fold_bn"))]


def model_vs_torchvision(x_fn, train, channels_last=False, kinds=MODEL_KINDS, check=None):
    """Output (and, in training, every buffer) of each fused model against torchvision, in
    float64 (a batch of 2 at 16x16 leaves 2 values per channel for the last training BNs, whose
    output float32 rounding would dominate)."""
    pairs = []
    for kind in kinds:
        if train and kind.startswith("fold_bn"):
            continue
        reference, fused = model_pair(kind, train, channels_last, D)
        x = x_fn()
        with torch.no_grad():
            out, ref = fused(x), reference(x)
        if check is not None:
            check(out, ref)
        pairs.append((out, ref))
        if train:
            buffers = dict(reference.named_buffers())
            pairs += [(b, buffers[name]) for name, b in fused.named_buffers()]
    return pairs


def nan_image_eval(out, ref):
    """A NaN in image 1 makes image 1's logits NaN and leaves image 0 finite."""
    assert out[1].isnan().all() and out[0].isfinite().all()


def all_nan(out, ref):
    """In training BN mixes the images: one NaN makes every logit NaN (as torchvision)."""
    assert out.isnan().all()


def block_pair(kind, train):
    """(torchvision block, fusedres.nn block) with the same weights: BasicBlock(4, 4) or
    Bottleneck(16, 4)."""
    import torchvision  # a dependency of fusedres
    torch.manual_seed(0)
    args = (C, C) if kind == "BasicBlock" else (4 * C, C)
    reference = getattr(torchvision.models.resnet, kind)(*args)
    fused = getattr(fusedres.nn, kind)(*args)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    fused.load_state_dict(reference.state_dict())
    return reference.train(train), fused.train(train)


def block_call(kind, x_fn, train=False):
    return lambda: block_pair(kind, train)[1](x_fn())


def block_vs_torchvision(kind, x_fn, train):
    reference, fused = block_pair(kind, train)
    x = x_fn()
    with torch.no_grad():
        out, ref = fused(x), reference(x)
    pairs = [(out, ref)]
    if train:
        buffers = dict(reference.named_buffers())
        pairs += [(b, buffers[name]) for name, b in fused.named_buffers()]
    return pairs


def convert_plain():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    weight = model[0].weight.clone()
    converted = fusedres.convert(model)
    assert type(converted[0]) is nn.Conv2d and converted is model  # in place
    return [(converted[0].weight, weight)]


def untracked_block():
    """A BasicBlock whose BNs keep no running statistics (they use batch statistics in
    eval too)."""
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    return fusedres.nn.BasicBlock(C, C, norm_layer=norm).eval()


def untracked_block_vs_torchvision():
    import torchvision  # a dependency of fusedres
    torch.manual_seed(0)
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    reference = torchvision.models.resnet.BasicBlock(C, C, norm_layer=norm).eval()
    fused = fusedres.nn.BasicBlock(C, C, norm_layer=norm).eval()
    fused.load_state_dict(reference.state_dict())
    x = x4(2, C, 5, 5)
    with torch.no_grad():
        return [(fused(x), reference(x))]


def fold_untracked_block():
    block = untracked_block()
    try:
        fusedres.fold_bn(block, inplace=True)
    finally:  # nothing was folded before the error
        assert isinstance(block.bn1, nn.BatchNorm2d) and block.conv1.bias is None


# ---- the CLI --------------------------------------------------------------------------------------


class UsageError(Exception):
    """`python -m fusedres` exited with status 2 (argparse's usage error)."""


def cli(*argv):
    """Runs `python -m fusedres argv`; a usage error becomes UsageError(its message)."""
    from fusedres.__main__ import main

    def call():
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                status = main(list(argv))
        except SystemExit as e:
            raise UsageError(f"exit status {e.code}: {stderr.getvalue().strip()}") from None
        assert status == 0, f"exit status {status}"
    return call


def cli_error(input, message, note=""):
    return raises("`python -m fusedres`", f"`{input}`{note}", UsageError, message,
                  cli(*input.split()), backends=ANY, shown="exit status 2")


def without_gpu(call):
    def run():
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
        call()
    return run


# ---- the table ------------------------------------------------------------------------------------

BN, ADD, DUAL = "`batch_norm_relu`", "`batch_norm_add_relu`", "`dual_batch_norm_add_relu`"
ADD_BN = "`add_batch_norm_relu`"
ADD_RELU, FOLD = "`add_relu`", "`fold_conv_bn`"
CONV, CONV_ADD, FUSED_CONV = "`conv_bias_relu`", "`conv_bias_add_relu`", "`fused_conv2d`"
BLOCKS, MODELS = "`fusedres.nn.BasicBlock` / `Bottleneck`", "models: " + ", ".join(
    f"`{k}`" for k in MODEL_KINDS)


def _bn(x, **changes):
    return lambda: FF.batch_norm_relu(x() if callable(x) else x, **{**bn_params(), **changes})


CASES = [
    # ---- BN ops: rank, dtype, channels, devices ----
    raises(BN, "0-D input", ValueError,
           "input must have shape (N, C, ...) with at least 2 dimensions, got shape ()",
           _bn(torch.tensor(1.0))),
    raises(BN, "1-D input", ValueError, "input must have shape (N, C, ...)", _bn(torch.ones(C))),
    raises(BN, "int64 / bool / complex64 input", TypeError,
           "input must be float16, bfloat16, float32 or float64, got torch.",
           _bn(torch.ones(2, C, 3, 3, dtype=torch.int64)),
           _bn(torch.ones(2, C, 3, 3, dtype=torch.bool)),
           _bn(torch.ones(2, C, 3, 3, dtype=torch.complex64)),
           text="input must be float16, bfloat16, float32 or float64, got torch.int64 (torch.bool, "
           "torch.complex64)"),
    raises(BN, "running_mean of C + 1 elements", ValueError,
           "running_mean should contain 4 elements (one per channel), got shape (5,)",
           _bn(x4(), running_mean=torch.zeros(C + 1))),
    raises(BN, "input with the wrong channel count for the parameters", ValueError,
           "running_mean should contain 3 elements (one per channel), got shape (4,)",
           _bn(x4(2, 3, 3, 3))),
    raises(BN, "int64 weight", TypeError, "weight must be a floating point tensor, got torch.int64",
           _bn(x4(), weight=torch.ones(C, dtype=torch.int64))),
    raises(BN, "float32 input, float16 weight and bias (float32 statistics)", TypeError,
           "weight must have the dtype of running_mean (torch.float32), got torch.float16",
           _bn(x4(), weight=torch.ones(C).half(), bias=torch.zeros(C).half())),
    raises(BN, "float32 input, float16 running statistics", TypeError,
           "running_mean must be torch.float32 for a torch.float32 input (as in "
           "torch.nn.functional.batch_norm), got torch.float16",
           _bn(x4(), **{k: v.half() for k, v in bn_params().items()})),
    raises(BN, "float16 input, bfloat16 parameters", TypeError,
           "running_mean must be torch.float16 or torch.float32 for a torch.float16 input",
           _bn(x4(dtype=torch.float16), **bn_params(torch.bfloat16))),
    matches(BN, "float16 input, float32 parameters (mixed precision)",
            "matches `F.batch_norm` (which takes this mix too)",
            lambda: bn_vs_torch(x4(dtype=torch.float16)),
            lambda: bn_vs_torch(x4(dtype=torch.float16), training=False)),
    raises(BN, "running_mean on `meta`, input on `cpu`", RuntimeError,
           "running_mean is on meta but input is on cpu",
           _bn(x4(), running_mean=torch.zeros(C, device="meta"))),
    raises(BN, "input on `meta`, parameters on `cpu`", RuntimeError,
           "running_mean is on cpu but input is on meta", _bn(torch.empty(2, C, 3, 3, device="meta"))),
    raises(BN, "`num_batches_tracked` with 3 elements", ValueError,
           "num_batches_tracked must have one element (a counter), got shape (3,)",
           _bn(x4(), training=True, momentum=None, num_batches_tracked=torch.zeros(3))),
    raises(BN, "`num_batches_tracked` on `meta`, input on `cpu`", RuntimeError,
           "num_batches_tracked is on meta but input is on cpu",
           _bn(x4(), training=True, momentum=None,
               num_batches_tracked=torch.tensor(0, device="meta"))),
    raises(BN, "training with one value per channel: (1, C, 1, 1) or (1, C)", ValueError,
           "Expected more than 1 value per channel when training",
           _bn(x4(1, C, 1, 1), training=True), _bn(x4(1, C), training=True)),
    matches(BN, "N = 0, training and eval",
            "empty output; running statistics unchanged (as `F.batch_norm`)",
            lambda: bn_vs_torch(x4(0, C, 3, 3, layout="channels_last")),
            lambda: bn_vs_torch(x4(0, C, 3, 3), training=False)),
    matches(BN + ", " + ADD + ", " + ADD_RELU,
        "(2, 2, 32768, 32768) channels_last: 2**32 elements (shapes only, `FakeTensorMode`)",
        "runs; output has the input's shape and strides (the Python checks and the fake "
        "kernels; no memory used)",
        huge(huge_bn)),

    # ---- BN ops: strides, layouts, values ----
    matches(BN + ", " + ADD, "input / residual expanded (stride-0 dims), training and eval",
            "matches `F.batch_norm` (+ residual) + ReLU",
            lambda: bn_vs_torch(expanded((2, C, 3, 3), 0), expanded((2, C, 3, 3), 3)),
            lambda: bn_vs_torch(expanded((2, C, 3, 3), 2), expanded((2, C, 3, 3), 0),
                                training=False)),
    matches(BN + ", " + ADD, "input / residual overlapping in memory (`as_strided`)",
            "matches `F.batch_norm` (+ residual) + ReLU",
            lambda: bn_vs_torch(overlapping((2, C, 3, 3), (5, 3, 2, 1)),
                                overlapping((2, C, 3, 3), (1, 2, 3, 1))),
            lambda: bn_vs_torch(overlapping((2, C, 3, 3), (5, 3, 2, 1)), training=False)),
    matches(BN, "strided input (every other column)", "matches `F.batch_norm` + ReLU",
            lambda: bn_vs_torch(x4(2, C, 3, 3, layout="strided")),
            lambda: bn_vs_torch(x4(2, C, 3, 3, layout="strided"), training=False)),
    matches(ADD, "input channels_last, residual NCHW", "matches; output channels_last",
            lambda: bn_vs_torch(x4(layout="channels_last"), x4(), layout="channels_last"),
            lambda: bn_vs_torch(x4(layout="channels_last"), x4(), training=False,
                                layout="channels_last")),
    matches(ADD, "input NCHW, residual channels_last", "matches; output NCHW",
            lambda: bn_vs_torch(x4(), x4(layout="channels_last"), layout="nchw"),
            lambda: bn_vs_torch(x4(), x4(layout="channels_last"), training=False, layout="nchw")),
    matches(BN, "NaN in one channel, training",
            "that channel's output and running statistics NaN, the others untouched (as "
            "`F.batch_norm`)", lambda: nan_channel_training(NAN)),
    matches(BN, "+Inf in one channel, training", "that channel's output NaN, its running_mean "
            "Inf and running_var NaN (as `F.batch_norm`)", lambda: nan_channel_training(INF)),
    matches(ADD, "NaN / +-Inf in input and residual, eval",
            "elementwise: NaN stays NaN through the ReLU (as `torch.relu`), Inf as in PyTorch",
            lambda: bn_vs_torch(with_nan(with_nan(x4(), 0, 1, 0, 0, value=INF), 1, 3, 2, 2),
                                with_nan(with_nan(x4(), 0, 0, 0, 0), 1, 2, 1, 1, value=-INF),
                                training=False)),
    matches(BN, "NaN in running_var, eval", "that channel NaN (as `F.batch_norm`)",
            lambda: bn_vs_torch(x4(), training=False, params={
                **bn_params(), "running_var": with_nan(torch.rand(C) + 0.5, 1)})),
    raises(ADD, "residual of a broadcastable shape (1, C, 1, 1)", ValueError,
           "residual must have the shape of input (2, 4, 3, 3), got (1, 4, 1, 1)",
           lambda: FF.batch_norm_add_relu(x4(), x4(1, C, 1, 1), **bn_params())),
    raises(ADD, "int64 residual", TypeError,
           "residual must have the dtype of input (torch.float32), got torch.int64",
           lambda: FF.batch_norm_add_relu(x4(), torch.ones(2, C, 3, 3, dtype=torch.int64),
                                          **bn_params())),
    raises(ADD, "residual on `meta`", RuntimeError, "residual is on meta but input is on cpu",
           lambda: FF.batch_norm_add_relu(x4(), torch.empty(2, C, 3, 3, device="meta"),
                                          **bn_params())),
    raises(ADD_BN, "residual of a broadcastable shape (1, C, 1, 1)", ValueError,
           "residual must have the shape of input (2, 4, 3, 3), got (1, 4, 1, 1)",
           lambda: FF.add_batch_norm_relu(x4(), x4(1, C, 1, 1), **bn_params(), training=True)),
    raises(ADD_BN, "float64 residual, float32 input", TypeError,
           "residual must have the dtype of input (torch.float32), got torch.float64",
           lambda: FF.add_batch_norm_relu(x4(), x4(dtype=torch.float64), **bn_params(),
                                          training=True)),
    matches(ADD_BN, "input / residual expanded (stride-0 dims), training and eval",
            "matches `x + z`, then `F.batch_norm` + ReLU",
            lambda: add_bn_vs_torch(expanded((2, C, 3, 3), 0), x4()),
            lambda: add_bn_vs_torch(x4(), expanded((2, C, 3, 3), 3), training=False)),
    matches(ADD_BN, "+Inf in the input and -Inf in the residual at one element, training",
            "the sum NaN there (as the add), that channel's output and statistics NaN",
            lambda: add_bn_vs_torch(with_nan(x4(), 1, 2, 0, 1, value=INF),
                                    with_nan(x4(), 1, 2, 0, 1, value=-INF))),
    raises(DUAL, "residual_weight of 5 elements", ValueError,
           "residual_weight should contain 4 elements",
           lambda: FF.dual_batch_norm_add_relu(x4(), x4(), *torch.zeros(4, C).unbind(),
                                               residual_weight=torch.ones(5), training=True)),
    matches(DUAL, "NaN in the residual (one channel), input channels_last, residual NCHW, "
            "training", "the residual's running statistics NaN in that channel, output NaN "
            "there (as two `F.batch_norm`)",
            lambda: dual_vs_torch(x4(layout="channels_last"), with_nan(x4(), 0, 1, 1, 1))),
    raises(ADD_RELU, "0-D input", ValueError, "input must have shape (N, C, ...) with at least "
           "1 dimensions", lambda: FF.add_relu(torch.tensor(1.0), torch.tensor(1.0))),
    raises(ADD_RELU, "complex64 input", TypeError, "input must be float16, bfloat16, float32 or "
           "float64, got torch.complex64",
           lambda: FF.add_relu(torch.ones(2, C, dtype=torch.complex64),
                               torch.ones(2, C, dtype=torch.complex64))),
    matches(ADD_RELU, "expanded input, overlapping residual, channels_last / NCHW mix, NaN",
            "matches `torch.relu(input + residual)`",
            lambda: [(FF.add_relu(a, b), torch.relu(a + b)) for a, b in [
                (expanded((2, C, 3, 3), 1), overlapping((2, C, 3, 3), (5, 3, 2, 1))),
                (with_nan(x4(layout="channels_last"), 1, 1, 1, 1), with_nan(x4(), 0, 0, 0, 0)),
            ]]),

    # ---- folding ----
    raises(FOLD, "int64 conv_weight", TypeError, "conv_weight must be float16, bfloat16, float32 "
           "or float64, got torch.int64",
           lambda: FF.fold_conv_bn(torch.ones(8, C, 3, 3, dtype=torch.int64), None,
                                   torch.zeros(8), torch.ones(8), 1e-5, None, None)),
    raises(FOLD, "2-D conv_weight", ValueError, "conv_weight must have shape (N, C, ...) with at "
           "least 3 dimensions", lambda: FF.fold_conv_bn(torch.ones(8, C), None, torch.zeros(8),
                                                         torch.ones(8), 1e-5, None, None)),
    raises(FOLD, "bn_running_var of 4 elements for 8 output channels", ValueError,
           "bn_running_var should contain 8 elements",
           lambda: FF.fold_conv_bn(conv_w(), None, torch.zeros(8), torch.ones(C), 1e-5, None, None)),
    raises(FOLD, "bn_running_mean on `meta`, conv_weight on `cpu`", RuntimeError,
           "bn_running_mean is on meta but conv_weight is on cpu",
           lambda: FF.fold_conv_bn(conv_w(), None, torch.zeros(8, device="meta"), torch.ones(8),
                                   1e-5, None, None)),
    raises(FOLD, "negative or non-numeric bn_eps", ValueError,
           "bn_eps must be a non-negative number, got",
           lambda: FF.fold_conv_bn(conv_w(), None, torch.zeros(8), torch.ones(8), -1.0, None,
                                   None),
           lambda: FF.fold_conv_bn(conv_w(), None, torch.zeros(8), torch.ones(8), "1e-5", None,
                                   None), text="bn_eps must be a non-negative number, got -1.0 "
           "('1e-5')"),
    matches(FOLD, "NaN in bn_running_var", "that output channel's weight and bias NaN (as the "
            "formula)", fold_with_nan),

    # ---- convolutions ----
    raises(CONV, "3-D input (unbatched)", ValueError, "input must have shape (N, C, H, W), got "
           "(4, 5, 5)", lambda: FF.conv_bias_relu(x4(C, 5, 5), conv_w())),
    raises(CONV, "int64 input / int64 weight", TypeError, "must be float16, bfloat16, float32 or "
           "float64, got torch.int64",
           lambda: FF.conv_bias_relu(torch.ones(2, C, 5, 5, dtype=torch.int64), conv_w()),
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w().long()),
           text="input (weight) must be float16, bfloat16, float32 or float64, got torch.int64"),
    raises(CONV, "float16 input, float32 weight", TypeError,
           "weight must have the dtype of input (torch.float16), got torch.float32",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5, dtype=torch.float16), conv_w())),
    raises(CONV, "input of 4 channels, weight for 3", ValueError,
           "input has 4 channels but weight expects 3 x groups=1",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(c_in=3))),
    raises(CONV, "groups=2 with 3 output channels", ValueError,
           "weight must have a multiple of groups=2 output channels, got shape (3, 2, 3, 3)",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(3, 2), groups=2)),
    raises(CONV, "stride 0 / padding -1 / dilation 0", ValueError, "must be ",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(), stride=0),
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(), padding=-1),
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(), dilation=0),
           text="stride must be positive, got [0, 0] (padding must be non-negative, dilation "
           "must be positive)"),
    raises(CONV, "0x0 kernel", ValueError, "weight must have a kernel of at least 1x1",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), make((8, C, 0, 0)))),
    raises(CONV + ", " + FUSED_CONV, "input smaller than the kernel (2x2 input, 3x3 kernel, no "
           "padding)", ValueError, "input's padded size must be at least the (dilated) kernel "
           "size 3x3, got 2x2", lambda: FF.conv_bias_relu(x4(2, C, 2, 2), conv_w()),
           lambda: FF.fused_conv2d(x4(2, C, 2, 2), conv_w())),
    raises(CONV, "bias of 4 elements for 8 output channels", ValueError,
           "bias should contain 8 elements",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w(), torch.zeros(C))),
    raises(CONV, "weight on `meta`", RuntimeError, "weight is on meta but input is on cpu",
           lambda: FF.conv_bias_relu(x4(2, C, 5, 5), conv_w().to("meta"))),
    raises(CONV_ADD, "residual of a broadcastable shape (1, C_out, 1, 1) / of the input's "
           "spatial size with stride 2", ValueError,
           "residual must have the convolution's output shape (2, 8, ",
           lambda: FF.conv_bias_add_relu(x4(2, C, 5, 5), conv_w(), None, x4(1, 8, 1, 1), 1, 1),
           lambda: FF.conv_bias_add_relu(x4(2, C, 5, 5), conv_w(), None, x4(2, 8, 5, 5), 2, 1),
           text="residual must have the convolution's output shape (2, 8, 5, 5), got (1, 8, 1, 1)"),
    raises(CONV_ADD, "stride 0", ValueError, "stride must be positive, got [0, 0]",
           lambda: FF.conv_bias_add_relu(x4(2, C, 5, 5), conv_w(), None, x4(2, 8, 5, 5), 0, 1)),
    raises(CONV_ADD, "float64 residual", TypeError,
           "residual must have the dtype of input (torch.float32), got torch.float64",
           lambda: FF.conv_bias_add_relu(x4(2, C, 5, 5), conv_w(), None,
                                         x4(2, 8, 5, 5, dtype=torch.float64), 1, 1)),
    raises(CONV_ADD, "residual on `meta`", RuntimeError, "residual is on meta but input is on cpu",
           lambda: FF.conv_bias_add_relu(x4(2, C, 5, 5), conv_w(), None,
                                         torch.empty(2, 8, 5, 5, device="meta"), 1, 1)),
    raises(FUSED_CONV, "int32 input_scale", TypeError,
           "input_scale must be a floating point tensor, got torch.int32",
           lambda: FF.fused_conv2d(x4(2, C, 5, 5), conv_w(),
                                   input_scale=torch.ones(C, dtype=torch.int32),
                                   input_shift=torch.zeros(C))),
    raises(FUSED_CONV, "input_scale without input_shift", ValueError,
           "input_scale and input_shift must be given together",
           lambda: FF.fused_conv2d(x4(2, C, 5, 5), conv_w(), input_scale=torch.ones(C))),
    matches(CONV, "N = 0", "empty output (as `F.conv2d`)",
            lambda: conv_vs_torch(x4(0, C, 5, 5), conv_w())),
    matches(CONV_ADD, "expanded input and residual (stride-0 dims)",
            "matches `relu(F.conv2d + residual)`",
            lambda: conv_vs_torch(expanded((2, C, 5, 5), 0), conv_w(),
                                  expanded((2, 8, 5, 5), 2))),
    matches(CONV_ADD, "input channels_last, residual NCHW", "matches; output channels_last",
            lambda: conv_vs_torch(x4(2, C, 5, 5, layout="channels_last"), conv_w(),
                                  x4(2, 8, 5, 5), layout="channels_last")),
    matches(CONV_ADD, "input NCHW, weight channels_last", "matches; output NCHW (the input's "
            "format)", lambda: conv_vs_torch(x4(2, C, 5, 5), conv_w(layout="channels_last"),
                                             x4(2, 8, 5, 5), layout="nchw"),
            backends=("cpp", "triton")),
    matches(CONV_ADD, "NaN and Inf in input and residual",
            "NaN / Inf where `relu(F.conv2d + residual)` has them",
            lambda: conv_vs_torch(with_nan(with_nan(x4(2, C, 5, 5), 0, 1, 2, 2), 1, 0, 0, 0,
                                           value=INF), conv_w(),
                                  with_nan(x4(2, 8, 5, 5), 0, 0, 4, 4))),
    matches(CONV_ADD, "(2, 2, 32768, 32768) channels_last: 2**32 elements (`FakeTensorMode`)",
            "runs; output (2, 4, 32768, 32768) channels_last", huge(huge_conv)),

    # ---- blocks ----
    raises(BLOCKS, "input of 8 channels into BasicBlock(4, 4), train and eval", ValueError,
           "BasicBlock input must have 4 channels (conv1.in_channels), got shape (2, 8, 5, 5)",
           block_call("BasicBlock", lambda: x4(2, 8, 5, 5), True),
           block_call("BasicBlock", lambda: x4(2, 8, 5, 5))),
    raises(BLOCKS, "float64 input into a float32 Bottleneck", TypeError,
           "Bottleneck input must have the dtype of its parameters (torch.float32), got "
           "torch.float64; convert one of them (model.to(dtype)) or run under torch.autocast",
           block_call("Bottleneck", lambda: x4(2, 16, 5, 5, dtype=torch.float64), True),
           block_call("Bottleneck", lambda: x4(2, 16, 5, 5, dtype=torch.float64))),
    raises(BLOCKS, "input on `meta`, block on `cpu`", RuntimeError,
           "BasicBlock input is on meta but its parameters are on cpu",
           block_call("BasicBlock", lambda: torch.empty(2, C, 5, 5, device="meta"))),
    matches(BLOCKS, "channels_last input into an NCHW block; expanded input; train and eval",
            "matches torchvision's block (output, running statistics)",
            lambda: block_vs_torchvision("BasicBlock", lambda: x4(2, C, 5, 5,
                                                                  layout="channels_last"), True),
            lambda: block_vs_torchvision("Bottleneck", lambda: expanded((2, 16, 5, 5), 0), False),
            lambda: block_vs_torchvision("Bottleneck", lambda: x4(2, 16, 5, 5,
                                                                  layout="channels_last"), False)),
    matches(BLOCKS, "eval, BN with `track_running_stats=False`",
            "batch statistics, as torchvision's block", untracked_block_vs_torchvision),

    # ---- models ----
    raises(MODELS, "3-D (unbatched) or 5-D input, train and eval", ValueError,
           "ResNet input must have shape (N, C, H, W) (4-D), got shape",
           *each_model(lambda: x4(3, 32, 32)), *each_model(lambda: x4(2, 3, 1, 32, 32)),
           text="ResNet input must have shape (N, C, H, W) (4-D), got shape (3, 32, 32)"),
    raises(MODELS, "input of 4 channels", ValueError,
           "ResNet input must have 3 channels (conv1.in_channels), got shape (2, 4, 32, 32)",
           *each_model(lambda: x4(2, 4, 32, 32))),
    raises(MODELS, "int64 / complex64 input", TypeError,
           "ResNet input must be float16, bfloat16, float32 or float64, got torch.",
           *each_model(lambda: torch.ones(2, 3, 32, 32, dtype=torch.int64)),
           *each_model(lambda: torch.ones(2, 3, 32, 32, dtype=torch.complex64)),
           text="ResNet input must be float16, bfloat16, float32 or float64, got torch.int64"),
    raises(MODELS, "float16 input into a float32 model, outside autocast", TypeError,
           "ResNet input must have the dtype of its parameters (torch.float32), got "
           "torch.float16; convert one of them (model.to(dtype)) or run under torch.autocast",
           *each_model(lambda: x4(2, 3, 32, 32, dtype=torch.float16))),
    raises(MODELS, "input on `meta`, model on `cpu`", RuntimeError,
           "ResNet input is on meta but its parameters are on cpu",
           *each_model(lambda: torch.empty(2, 3, 32, 32, device="meta"))),
    raises(MODELS, "a list instead of a tensor", TypeError, "ResNet input must be a Tensor, got "
           "list", *each_model(lambda: [[1.0]])),
    raises(MODELS, "training, batch of 1 at 32x32 (the last stage is 1x1; as torchvision)",
           ValueError,
           "Expected more than 1 value per channel when training, got input size "
           "torch.Size([1, 512, 1, 1])", *each_model(lambda: x4(1, 3, 32, 32), modes=(True,)),
           backends=NATIVE),
    raises(MODELS, "a 0x0 image, training", RuntimeError, "Kernel size can't be greater than "
           "actual input size", *each_model(lambda: x4(2, 3, 0, 0), modes=(True,)),
           backends=NATIVE, shown="RuntimeError (PyTorch's `F.conv2d`)"),
    raises(MODELS, "a 0x0 image, eval", RuntimeError, "Kernel size can't be greater than "
           "actual input size", *each_model(lambda: x4(2, 3, 0, 0), modes=(False,)),
           backends=NATIVE, shown="RuntimeError (PyTorch's `F.conv2d`)"),
    matches(MODELS, "N = 0, train and eval", "empty output; buffers as torchvision's",
            lambda: model_vs_torchvision(lambda: x4(0, 3, 16, 16, dtype=D), True),
            lambda: model_vs_torchvision(lambda: x4(0, 3, 16, 16, dtype=D), False), backends=NATIVE),
    matches(MODELS, "NCHW input into a channels_last model, and the reverse; train and eval",
            "matches torchvision (output, running statistics)",
            lambda: model_vs_torchvision(lambda: x4(2, 3, 16, 16, dtype=D), True, channels_last=True),
            lambda: model_vs_torchvision(lambda: x4(2, 3, 16, 16, layout="channels_last", dtype=D), False),
            backends=NATIVE),
    matches(MODELS, "one image expanded to a batch of 2 (stride 0), eval",
            "matches torchvision", lambda: model_vs_torchvision(lambda: expanded((2, 3, 16, 16), 0, D),
                                                                False),
            backends=NATIVE),
    matches(MODELS, "NaN in image 1", "eval: image 1's logits NaN, image 0's finite; training: "
            "every logit and running statistic NaN (BN mixes the batch); as torchvision",
            lambda: model_vs_torchvision(lambda: with_nan(x4(2, 3, 16, 16, dtype=D), 1, 0, 5, 5), False,
                                         check=nan_image_eval),
            lambda: model_vs_torchvision(lambda: with_nan(x4(2, 3, 16, 16, dtype=D), 1, 0, 5, 5), True,
                                         check=all_nan),
            backends=NATIVE),
    matches(MODELS, "the whole model and its input on `meta`", "runs (shapes only): (2, 10) "
            "logits on `meta`", lambda: [(model_pair(kind)[1].to("meta")(
                torch.empty(2, 3, 32, 32, device="meta")).shape, torch.Size([2, 10]))
                for kind in MODEL_KINDS], backends=("auto",)),

    # ---- convert / fold_bn ----
    raises("`convert()`", "a string (not a module)", TypeError,
           "fusedres.convert: model must be an nn.Module, got str",
           lambda: fusedres.convert("resnet18"), backends=ANY),
    raises("`fold_bn()`", "a tensor (not a module)", TypeError,
           "fusedres.fold_bn: model must be an nn.Module, got Tensor",
           lambda: fusedres.fold_bn(torch.ones(1)), backends=ANY),
    raises("`fold_bn()`", "a model in training mode", RuntimeError,
           "fusedres.fold_bn: the model is in training mode",
           lambda: fusedres.fold_bn(fusedres.nn.BasicBlock(C, C)), backends=ANY),
    raises("`fold_bn()`", "a block whose BN has `track_running_stats=False`", ValueError,
           "fusedres.fold_bn: bn1 has no running statistics", fold_untracked_block,
           backends=ANY),
    matches("`convert()`", "a model without ResNet blocks", "returned as it is (the same object)",
            convert_plain, backends=ANY),

    # ---- the CLI ----
    cli_error("--batch 0", "argument --batch: must be a positive integer, got '0'"),
    cli_error("--batch abc", "argument --batch: must be a positive integer, got 'abc'"),
    cli_error("--size -1", "argument --size: must be a positive integer, got '-1'"),
    cli_error("--iters 0", "argument --iters: must be a positive integer, got '0'"),
    cli_error("--batch 1 --size 32", "--batch 1 with --size 32 leaves one value per channel in "
              "the last stage (1x1 pixels), too few for training batch norm"),
    cli_error("--arch resnet51", "argument --arch: invalid choice: 'resnet51'"),
    cli_error("--arch vgg16", "argument --arch: invalid choice: 'vgg16'"),
    cli_error("--backend foo", "argument --backend: invalid choice: 'foo'"),
    cli_error("--providers eager,foo", "argument --providers: unknown provider 'foo'"),
    raises("`python -m fusedres`", "`--providers fusedres-cuda` (no GPU)", UsageError,
           "argument --providers: fusedres-cuda cannot run on this machine",
           without_gpu(cli("--providers", "fusedres-cuda")), backends=ANY, shown="exit status 2"),
    matches("`python -m fusedres`", "`--ops-only --backend reference`",
            "exit status 0 (op checks pass)", lambda: cli("--ops-only", "--backend", "reference")(),
            backends=ANY),
]


# ---- running the table --------------------------------------------------------------------------


def _params():
    triton_here = fusedres._backend.unavailable_reason("triton", "cpu") is None
    for i, case in enumerate(CASES):
        for backend in case.backends:
            marks = [pytest.mark.skip(reason="the Triton kernels cannot run on CPU tensors here")
                     ] if backend == "triton" and not triton_here else []
            name = re.sub(r"[`*]", "", f"{case.where}: {case.input}")[:70]
            yield pytest.param(case, backend, id=f"{i:02d}-{backend}-{name}", marks=marks)


def assert_same(got, expected, case):
    if isinstance(got, torch.Size):
        assert got == expected
        return
    assert got.shape == expected.shape, (got.shape, expected.shape)
    loose = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(got.dtype)
    rtol = case.tolerance.get("rtol", loose or 1e-4)
    atol = case.tolerance.get("atol", loose or 1e-5)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("case, backend", list(_params()))
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, NaN
def test_bad_input(case, backend):
    with fusedres.backend(backend):
        for call in case.calls:
            if case.error is not None:
                with pytest.raises(case.error, match=re.escape(case.message)):
                    call()
            else:
                for got, expected in call() or []:
                    assert_same(got, expected, case)


def table() -> str:
    lines = ["| where | input | outcome |", "|---|---|---|"]
    for case in CASES:
        cells = [case.where, case.input, case.outcome]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def readme(text: str) -> str:
    """The README text with the table between the markers replaced by the current one."""
    head, rest = text.split(README_BEGIN + "\n", 1)
    return head + README_BEGIN + "\n" + table() + README_END + rest.split(README_END, 1)[1]


def markdown() -> str:
    lines = [
        "# Bad input: what fusedres does with it",
        "",
        ("Generated from the table `CASES` in `tests/test_bad_input.py` (`python "
         "tests/test_bad_input.py` rewrites this file); every row is a test, run on the cpp, "
         "reference and (interpreted) Triton backends where it makes sense. Errors are raised "
         "before any kernel runs; the outcome quotes the message (after its `fusedres: ` "
         "prefix) or a part of it. \"Matches\" means "
         "equal to the unfused PyTorch computation (or torchvision), NaN and Inf included."),
        "",
    ]
    return "\n".join(lines) + "\n" + table()


def test_markdown_tables_are_current():
    assert MARKDOWN.read_text() == markdown(), \
        "tests/BAD_INPUT.md is stale: run python tests/test_bad_input.py"
    text = README.read_text()
    assert text == readme(text), "README.md's bad-input table is stale: run python tests/test_bad_input.py"


if __name__ == "__main__":
    MARKDOWN.write_text(markdown())
    README.write_text(readme(README.read_text()))
    print(f"wrote {MARKDOWN} and the table in {README} ({len(CASES)} rows)")
