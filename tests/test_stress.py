"""Numerics under stress, against the unfused computation in float64:
- channels whose mean dwarfs their spread (E[x^2] - E[x]^2 fails there), in every residual
  form, forward, backward and running statistics;
- float16 / bfloat16 magnitude edges: inputs near 65504, sums that fit float32 but not float16,
  outputs that round to inf exactly where the float32-computed-then-rounded result does,
  bfloat16 values whose squares overflow float32;
- BN folding with running_var 1e-12 / 0 (eps keeps it finite) against the unfolded BN;
- running statistics over long runs of drifting data (momentum and the momentum=None
  cumulative average), for the fused ops and a converted model against torchvision."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONV_TOLERANCE,
    DTYPES,
    LAYOUTS,
    NATIVE_TARGETS,
    TARGETS,
    TOLERANCE,
    assert_as_accurate,
    assert_close,
    assert_state_as_accurate,
    rel_err,
    use,
)

import fusedres
import fusedres.functional as FF

# Gradients of low-precision tensors are rounded once more than the output (test_batch_norm).
GRAD_TOLERANCE = {**TOLERANCE, torch.float16: 4e-3, torch.bfloat16: 2e-2}
KINDS = ["none", "add", "dual"]
# Batch statistics in float32 against float64 (running statistics here): cpp and triton merge
# their partial moments around one shift per channel, which keeps 1e-5 even at a mean of 3e4
# with a spread of 1; the CUDA kernels shift per thread and merge float means (about 2.5e-5
# there; measured in their emulation build, not yet on a GPU).
STATS_TOLERANCE = {"cpp": 1e-5, "triton": 1e-5, "cuda": 1e-4, "cuda-emulated": 1e-4}
GPU_TARGETS = [t for t in TARGETS if t.id in ("cuda", "triton-cuda")]


def channel_data(shape, means, spread, dtype, device, layout="nchw", seed=0, clamp=None):
    """randn * spread + means[c], drawn in float64 and rounded once to dtype."""
    g = torch.Generator().manual_seed(seed)
    means = torch.as_tensor(means, dtype=torch.float64).reshape((1, -1) + (1,) * (len(shape) - 2))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * spread + means
    if clamp is not None:
        t = t.clamp(-clamp, clamp)
    t = t.to(dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t.to(device)


def bn_state(C, device, seed, weight_scale=1.0, means=None, variances=None):
    """[running_mean, running_var, weight, bias] in float32."""
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(C, generator=g) if means is None else torch.as_tensor(means).float()
    rv = torch.rand(C, generator=g) + 0.5 if variances is None else torch.as_tensor(variances).float()
    w = (torch.rand(C, generator=g) + 0.5) * weight_scale
    b = torch.randn(C, generator=g)
    return [t.to(device) for t in (rm, rv, w, b)]


def copies(state, dtype, grad=False):
    """Detached copies in dtype; weight and bias require grad when asked."""
    return [t.detach().to(dtype).clone().requires_grad_(grad and i >= 2)
            for i, t in enumerate(state)]


def unfused(kind, x, z, p, q, training, relu=True, momentum=0.1, eps=1e-5):
    """relu(bn(x) [+ z | + bn(z)]) by F.batch_norm in x's dtype; updates p's / q's stats."""
    out = F.batch_norm(x, p[0], p[1], p[2], p[3], training, momentum, eps)
    if kind == "add":
        out = out + z
    elif kind == "dual":
        out = out + F.batch_norm(z, q[0], q[1], q[2], q[3], training, momentum, eps)
    return torch.relu(out) if relu else out


def fused(kind, x, z, p, q, training, relu=True, momentum=0.1, eps=1e-5, nbt=None, nbt_q=None):
    if kind == "none":
        return FF.batch_norm_relu(x, *p, training, momentum, eps, relu=relu,
                                  num_batches_tracked=nbt)
    if kind == "add":
        return FF.batch_norm_add_relu(x, z, *p, training, momentum, eps, relu=relu,
                                      num_batches_tracked=nbt)
    return FF.dual_batch_norm_add_relu(x, z, p[0], p[1], q[0], q[1], p[2], p[3], q[2], q[3],
                                       training, momentum, eps, relu=relu,
                                       num_batches_tracked=nbt, residual_num_batches_tracked=nbt_q)


def leaves(kind, x, z, p, q):
    out = [x, p[2], p[3]]
    if kind != "none":
        out.append(z)
    if kind == "dual":
        out += [q[2], q[3]]
    return out


def run_three_ways(kind, x, z, p, q, training, grad_out=None, **kw):
    """The fused op (on p / q) and the unfused computation in float64 (the truth) and in
    float32 (PyTorch's own rounding on this case: how ill-conditioned it is). Returns
    {name: (out, grads, running stats)}."""
    results = {}
    need = grad_out is not None
    for name, dtype in (("fused", None), ("float64", torch.float64), ("float32", torch.float32)):
        xs = x.detach().to(dtype or x.dtype, copy=True).requires_grad_(need)
        zs = z.detach().to(dtype or z.dtype, copy=True).requires_grad_(need) if z is not None else None
        ps, qs = copies(p, dtype or p[0].dtype, need), copies(q, dtype or q[0].dtype, need)
        if dtype is None:
            out = fused(kind, xs, zs, ps, qs, training, **kw)
        else:
            out = unfused(kind, xs, zs, ps, qs, training, **kw)
        grads = []
        if grad_out is not None:
            grads = torch.autograd.grad(out, leaves(kind, xs, zs, ps, qs),
                                        grad_out.to(out.dtype))
        stats = ps[:2] + (qs[:2] if kind == "dual" else [])
        results[name] = (out.detach(), grads, [s.detach() for s in stats])
    return results


def assert_three_ways(results, dtype, training):
    out, grads, stats = results["fused"]
    out64, grads64, stats64 = results["float64"]
    out32, grads32, stats32 = results["float32"]
    assert out.dtype == dtype
    assert_as_accurate(out, out32, out64, TOLERANCE[dtype])
    for g, g64, g32 in zip(grads, grads64, grads32):
        assert_as_accurate(g, g32, g64, GRAD_TOLERANCE[g.dtype])
    if training:
        for s, s64, s32 in zip(stats, stats64, stats32):
            assert_as_accurate(s, s32, s64, STATS_TOLERANCE[fusedres.get_backend()])


# ---- large mean, small variance --------------------------------------------------------------

# dtype: (per-channel means, spread). float32: x^2 ~ 1e8 has an ulp of 8, so E[x^2] - E[x]^2
# loses every digit of a variance of 1; float16 / bfloat16: the spread is a few ulps of the mean.
LARGE_MEAN = {
    torch.float32: ([1e4, -3e4, 2e4, 5e3, -1e4], 1.0),
    torch.float16: ([1e3, -1.5e3, 6e2, 3e2, -1e3], 4.0),
    torch.bfloat16: ([1e3, -1.5e3, 6e2, 3e2, -1e3], 32.0),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_large_mean_small_variance(target, dtype, kind):
    """Forward, backward and running statistics of every form; test_batch_norm covers the
    float32 forward of batch_norm_relu only."""
    device = use(target)
    means, spread = LARGE_MEAN[dtype]
    shape = (4, 5, 6, 7) if device == "cpu" else (64, 5, 28, 28)  # GPU: long per-thread sums
    for layout in LAYOUTS:
        x = channel_data(shape, means, spread, dtype, device, layout, seed=1)
        z = None
        if kind == "add":  # a plain residual of the size of the normalized output
            z = channel_data(shape, [0.0] * 5, 1.0, dtype, device, layout, seed=2)
        elif kind == "dual":
            z = channel_data(shape, means[::-1], spread, dtype, device, layout, seed=2)
        p, q = bn_state(5, device, 3), bn_state(5, device, 4)
        grad_out = channel_data(shape, [0.0] * 5, 1.0, dtype, device, layout, seed=5)
        for training in (True, False):
            if not training:  # eval with running statistics of the same regime
                p[0], p[1] = torch.tensor(means, device=device), torch.full((5,), spread ** 2,
                                                                              device=device)
                q[0], q[1] = p[0].flip(0), p[1].clone()
            results = run_three_ways(kind, x, z, p, q, training, grad_out)
            assert_three_ways(results, dtype, training)

    if dtype == torch.float32 and device == "cpu":  # the case is a real trap
        dims = (0, 2, 3)
        xf = x.float()
        naive = (xf * xf).mean(dims) - xf.mean(dims) ** 2
        true = x.double().var(dims, unbiased=False)
        assert ((naive.double() - true).abs() / true).max() > 0.5


# ---- float16 / bfloat16 magnitude edges ------------------------------------------------------


def rounding_boundary(dtype):
    """The smallest magnitude that rounds to inf in dtype: max + half an ulp of max."""
    big = torch.finfo(dtype).max
    return big + torch.finfo(dtype).eps * 2.0 ** (math.frexp(big)[1] - 1) / 2


def assert_saturates_like(out, truth, dtype):
    """out is inf (with the sign) exactly where the float64 truth rounded to dtype is, away
    from a hair's breadth of the rounding boundary, and accurate where finite."""
    boundary = rounding_boundary(dtype)
    truth = truth.double().to(out.device)
    rounded = truth.to(dtype)
    away = ((truth.abs() - boundary).abs() > 1e-4 * boundary).flatten()
    out_f, rounded_f = out.flatten()[away], rounded.flatten()[away]
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isinf(out_f), torch.isinf(rounded_f))
    inf = torch.isinf(rounded_f)
    assert torch.equal(out_f[inf], rounded_f[inf])  # same signs
    assert 0 < inf.sum() < inf.numel(), "the case should have both finite and infinite values"
    finite = ~inf
    assert_close(out_f[finite], truth.flatten()[away][finite], dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (2, 16, 4, 4)])  # scalar and vector paths
def test_add_relu_rounds_to_inf_like_float32(target, dtype, layout, shape):
    """relu(x + z) computed in float32 and rounded once: bit-identical, infs included."""
    device = use(target)
    if dtype == torch.bfloat16 and target == ("triton", "cpu"):
        pytest.skip("the Triton interpreter rounds float32 -> bfloat16 toward zero (a GPU "
                    "rounds to nearest even)")
    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * big).to(dtype)
    z = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * big).to(dtype)
    # Around the rounding boundary: sums just below it, on it and above it, cancellation.
    step = torch.finfo(dtype).eps * 2.0 ** (math.frexp(big)[1] - 1)  # ulp of max
    edges = [(big, step / 2 - step / 64), (big, step / 2), (big, big), (-big, -big), (big, -big),
             (big / 2, big / 2), (big, 0.0), (-big, big / 2)]
    flat_x, flat_z = x.view(-1), z.view(-1)
    for i, (a, b) in enumerate(edges):
        flat_x[i], flat_z[i] = a, b
        flat_x[-1 - i], flat_z[-1 - i] = b, a  # and at the tail
    if layout == "channels_last":
        x, z = (t.to(memory_format=torch.channels_last) for t in (x, z))
    out = FF.add_relu(x.to(device), z.to(device))
    expected = torch.relu(x.float() + z.float()).to(dtype)
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_float16_near_max_stays_finite(target, kind, training):
    """float16 inputs up to 65504: the per-channel sums and squares (~1e12) and the centring
    x - mean need float32; in float16 they overflow or cancel. Large gradients too: the
    weight / bias gradients (float32 parameters) sum ~1e6 over a channel."""
    device = use(target)
    means = [6.5e4, -6.5e4, 3e4, 0.0, -5e4]
    spread = 300.0 if not training else 1e4
    shape = (4, 5, 6, 7)
    x = channel_data(shape, means, spread, torch.float16, device, seed=1, clamp=65504)
    z = None
    if kind == "add":
        z = channel_data(shape, [0.0] * 5, 1.0, torch.float16, device, seed=2)
    elif kind == "dual":
        z = channel_data(shape, means[::-1], spread, torch.float16, device, seed=2, clamp=65504)
    p = bn_state(5, device, 3, means=means, variances=[spread ** 2] * 5)
    q = bn_state(5, device, 4, means=means[::-1], variances=[spread ** 2] * 5)
    grad_out = (torch.rand(shape, dtype=torch.float64) * 3000 + 1000).to(torch.float16).to(device)
    results = run_three_ways(kind, x, z, p, q, training, grad_out)
    assert_three_ways(results, torch.float16, training)
    out, grads, _ = results["fused"]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if training:
        assert grads[2].abs().max() > 65504  # d bias: would overflow as a float16 sum
    else:  # scale and shift folded into float16 arithmetic cancel catastrophically
        rm, rv, w, b = p
        scale = (w / torch.sqrt(rv + 1e-5)).half()
        shift = (b - rm * w / torch.sqrt(rv + 1e-5)).half()
        naive = (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).double()
        pre = (x.double() - rm.double().view(1, -1, 1, 1)) * (
            w.double() / torch.sqrt(rv.double() + 1e-5)).view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        assert rel_err(naive, pre) > 10 * TOLERANCE[torch.float16]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_float16_outputs_saturate_like_reference(target, kind, training):
    """Outputs beyond 65504 round to +-inf exactly where the float64 result rounded to float16
    does (ReLU off so both signs show; the add form with a residual near 65504)."""
    device = use(target)
    shape = (4, 5, 6, 7)
    x = channel_data(shape, [1.0, -2.0, 0.5, 3.0, 0.0], 2.0, torch.float16, device, seed=1)
    z = None
    if kind == "add":
        z = channel_data(shape, [6e4, -6e4, 6.5e4, 0.0, 6.3e4], 2e3, torch.float16, device,
                         seed=2, clamp=65504)
    elif kind == "dual":
        z = channel_data(shape, [0.0] * 5, 1.0, torch.float16, device, seed=2)
    p = bn_state(5, device, 3, weight_scale=4e4)
    q = bn_state(5, device, 4, weight_scale=3e4)
    out = fused(kind, x, z, [t.clone() for t in p], [t.clone() for t in q], training, relu=False)
    truth = unfused(kind, x.double(), z.double() if z is not None else None,
                    copies(p, torch.float64), copies(q, torch.float64), training, relu=False)
    assert_saturates_like(out, truth, torch.float16)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_huge_magnitudes(target, kind):
    """bfloat16 means of 1e18 with a spread of 1e17: float32 sums of x^2 would overflow
    (~1e39), the centred sums do not; the variance (~1e34) fits float32. Forward, backward,
    running statistics; then eval with those running statistics."""
    device = use(target)
    means, spread = [2e18, -3e18, 1e18, 0.0, 3e18], 1e17
    shape = (4, 5, 6, 7)
    x = channel_data(shape, means, spread, torch.bfloat16, device, "channels_last", seed=1)
    z = None
    if kind == "add":
        z = channel_data(shape, [0.0] * 5, 1.0, torch.bfloat16, device, "channels_last", seed=2)
    elif kind == "dual":
        z = channel_data(shape, means[::-1], spread, torch.bfloat16, device, "channels_last",
                         seed=2)
    xf = x.float()
    assert torch.isinf((xf * xf).sum((0, 2, 3))).any()  # the naive sums overflow
    p, q = bn_state(5, device, 3), bn_state(5, device, 4)
    grad_out = channel_data(shape, [0.0] * 5, 1.0, torch.bfloat16, device, "channels_last",
                            seed=5)
    assert_three_ways(run_three_ways(kind, x, z, p, q, True, grad_out), torch.bfloat16, True)
    p[0], p[1] = torch.tensor(means, device=device), torch.full((5,), spread ** 2, device=device)
    q[0], q[1] = p[0].flip(0), p[1].clone()
    assert_three_ways(run_three_ways(kind, x, z, p, q, False), torch.bfloat16, False)


# ---- folding with tiny running variances -----------------------------------------------------

TINY_VARIANCES = [1e-12, 0.0, 1e-30, 0.0, 1e-12, 1.0, 0.25, 1e-8]


def per_channel_errors(out, ref, dim=0):
    """Relative norm error of each channel (slices along dim); no inf / NaN allowed."""
    out, ref = out.double().cpu().transpose(0, dim), ref.double().cpu().transpose(0, dim)
    errs = []
    for o, r in zip(out, ref):
        assert not torch.isnan(o).any() and not torch.isinf(o).any()
        errs.append(((o - r).norm() / r.norm()).item() if r.norm() > 0 else o.norm().item())
    return errs


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_tiny_running_var(target, dtype, eps, conv_bias):
    """running_var of 1e-12, 0 and 1e-30: eps alone keeps 1 / sqrt(v + eps) finite (up to
    316x). Each folded weight and bias channel, and the folded conv + bias + ReLU, against the
    unfolded conv + eval BN in float64: no inf / NaN, per-channel relative error within
    ARCHITECTURE.md's tolerances."""
    device = use(target)
    C = len(TINY_VARIANCES)
    g = torch.Generator().manual_seed(0)
    w64 = torch.randn(C, 4, 3, 3, generator=g, dtype=torch.float64) * 0.1
    cb64 = torch.randn(C, generator=g, dtype=torch.float64) * 0.1 if conv_bias else None
    rm64 = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
    rv64 = torch.tensor(TINY_VARIANCES, dtype=torch.float64)
    gamma64 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    beta64 = torch.randn(C, generator=g, dtype=torch.float64)
    x64 = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    w = w64.to(dtype).to(device)
    cb = cb64.to(dtype).to(device) if conv_bias else None
    stats = [t.float().to(device) for t in (rm64, rv64, gamma64, beta64)]
    weight, bias = FF.fold_conv_bn(w, cb, stats[0], stats[1], eps, stats[2], stats[3])
    assert weight.dtype == dtype and bias.dtype == dtype

    # Truth: from the rounded inputs, in float64.
    w64, cb64 = w.double().cpu(), cb.double().cpu() if conv_bias else None
    rm64, rv64, gamma64, beta64 = [t.double().cpu() for t in stats]
    scale = gamma64 / torch.sqrt(rv64 + eps)
    ref_weight = w64 * scale.view(-1, 1, 1, 1)
    ref_bias = ((cb64 if conv_bias else 0) - rm64) * scale + beta64
    assert max(per_channel_errors(weight, ref_weight)) <= TOLERANCE[dtype]
    assert max(per_channel_errors(bias.view(-1, 1), ref_bias.view(-1, 1))) <= TOLERANCE[dtype]

    x = x64.to(dtype)
    ref = torch.relu(F.batch_norm(F.conv2d(x.double(), w64, cb64, padding=1), rm64, rv64,
                                  gamma64, beta64, False, 0.0, eps))
    if target[0] == "triton" and device == "cpu" and dtype == torch.bfloat16:
        out = torch.relu(F.conv2d(x, weight.cpu(), bias.cpu(), padding=1))  # see _triton_conv_dtype
    else:
        out = FF.conv_bias_relu(x.to(device), weight, bias, padding=1)  # TF32 off: conftest
    assert max(per_channel_errors(out, ref, 1)) <= CONV_TOLERANCE[dtype]


def small_resnet(torchvision, **kwargs):
    """A four-block torchvision ResNet (a projection shortcut in three of them)."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, **kwargs)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_fold_bn_model_with_zero_running_var(target):
    """A converted model whose BNs have channels of running_var 0 / 1e-12 (dead channels of a
    trained network): fold_bn, the eval model under no_grad and with
    autograd on all agree with torchvision's eval as closely as torchvision's own float32."""
    import torchvision  # a dependency of fusedres
    device = use(target)
    reference = small_resnet(torchvision)
    with torch.no_grad():
        for i, m in enumerate(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if i % 3 == 1:
                m.running_var[::4] = 0.0
                m.running_var[1::4] = 1e-12
    reference = reference.eval().to(device)
    reference64 = copy.deepcopy(reference).double()
    converted = fusedres.convert(copy.deepcopy(reference)).eval()
    folded = fusedres.fold_bn(converted)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        ref, ref64 = reference(x), reference64(x.double())
        outs = [folded(x), converted(x), converted(x)]  # the second call: from the cache
    outs.append(converted(x).detach())  # autograd on: folded through ATen
    for out in outs:
        assert torch.isfinite(out).all()
        assert_as_accurate(out, ref, ref64, 1e-4)


# ---- long runs: running statistics under drift -----------------------------------------------


def drifting_batch(step, shape, device, seed_offset=0):
    """Batch `step` of a drifting stream: the channel means walk (channel 0 far from 0 with a
    small spread), the spread oscillates."""
    C = shape[1]
    g = torch.Generator().manual_seed(10_000 * seed_offset + step)
    means = torch.linspace(-2, 2, C, dtype=torch.float64) + 0.02 * step * torch.arange(1, C + 1)
    means[0] = 1e3 + 0.5 * step
    spread = (1 + 0.5 * math.sin(step / 15)) * (1 + torch.arange(C, dtype=torch.float64) / C)
    spread[0] = 0.1
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread.view(1, -1, 1, 1)
    return (x + means.view(1, -1, 1, 1)).float().to(device)


def _long_run_params():
    """Every (kind, momentum) on the compiled backends; two on the (slow) Triton interpreter."""
    params = []
    for t in TARGETS:
        for kind in KINDS:
            for momentum in (0.1, None):
                if t.id == "triton-interpreter" and (kind, momentum) not in (("none", 0.1),
                                                                             ("dual", None)):
                    continue
                params.append(pytest.param(t.values[0], kind, momentum, marks=t.marks,
                                           id=f"{t.id}-{kind}-{momentum}"))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("target, kind, momentum", _long_run_params())
def test_running_stats_long_run(target, kind, momentum):
    """300 training steps (200 in the interpreter) of drifting data: running_mean,
    running_var and num_batches_tracked against nn.BatchNorm2d in float64 (and float32 for
    PyTorch's own rounding) every 50 steps; momentum=None is the cumulative average."""
    device = use(target)
    steps = 200 if target == ("triton", "cpu") else 300
    shape, C = (3, 5, 4, 4), 5
    modules = {dtype: [torch.nn.BatchNorm2d(C, momentum=momentum).to(device, dtype)
                       for _ in range(2)] for dtype in (torch.float64, torch.float32)}
    mine = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules[torch.float32]]
    for step in range(steps):
        x = drifting_batch(step, shape, device)
        z = drifting_batch(step, shape, device, seed_offset=1).flip(1)
        with torch.no_grad():
            for dtype, (bn, bn_res) in modules.items():
                bn(x.to(dtype))
                bn_res(z.to(dtype))
        p = [mine[0]["running_mean"], mine[0]["running_var"], None, None]
        q = [mine[1]["running_mean"], mine[1]["running_var"], None, None]
        fused(kind, x, z, p, q, True, momentum=momentum, nbt=mine[0]["num_batches_tracked"],
              nbt_q=mine[1]["num_batches_tracked"])
        if step % 50 == 49 or step == steps - 1:
            for i in range(2 if kind == "dual" else 1):
                ref64, ref32 = (modules[dtype][i].state_dict() for dtype in modules)
                for key in ("running_mean", "running_var"):
                    assert_as_accurate(mine[i][key], ref32[key], ref64[key], TOLERANCE[torch.float32])
                assert mine[i]["num_batches_tracked"].item() == step + 1
                assert ref32["num_batches_tracked"].item() == step + 1


@pytest.mark.slow
@pytest.mark.parametrize("target", NATIVE_TARGETS + GPU_TARGETS[1:])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_converted_model_running_stats_long_run(target, momentum):
    """200 training-mode forwards of drifting data through a converted four-block ResNet
    (plain and projection shortcuts) and through torchvision: every running statistic and
    num_batches_tracked as accurate (against float64) as torchvision's float32, every 50."""
    import torchvision  # a dependency of fusedres
    device = use(target)
    reference = small_resnet(torchvision)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    reference = reference.to(device).train()
    reference64 = copy.deepcopy(reference).double()
    converted = fusedres.convert(copy.deepcopy(reference))
    steps = 200
    for step in range(steps):
        x = drifting_batch(step, (4, 3, 16, 16), device)
        with torch.no_grad():
            reference(x)
            reference64(x.double())
        converted(x)  # autograd on: the training path
        if step % 50 == 49:
            assert_state_as_accurate(converted, reference, reference64)
    assert converted.layer4[0].downsample[1].num_batches_tracked.item() == steps
