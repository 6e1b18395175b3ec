"""The fused BN ops (batch_norm_relu, batch_norm_add_relu, dual_batch_norm_add_relu) against
the unfused PyTorch computation in fp64: outputs, running statistics and gradients."""
import pytest
import torch
import torch.nn.functional as F

import fusedres.functional as FF
from conftest import (TARGETS, TARGETS_AND_REFERENCE, DTYPES, LAYOUTS, TOLERANCE, assert_close,
                      make, has_layout, use)

SHAPE = (4, 6, 5, 7)  # odd spatial sizes: no vector path hides a tail bug


def bn_params(C, dtype=torch.float32, device="cpu", requires_grad=False):
    """(running_mean, running_var, weight, bias) with non-trivial values."""
    rm = torch.randn(C, dtype=torch.float64).to(dtype).to(device)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype).to(device)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype).to(device).requires_grad_(requires_grad)
    b = torch.randn(C, dtype=torch.float64).to(dtype).to(device).requires_grad_(requires_grad)
    return rm, rv, w, b


def reference_bn_act(x, residual, params, residual_params, training, momentum, eps, relu):
    """The unfused computation in fp64 on copies of the running stats."""
    rm, rv, w, b = [p.detach().double().clone() if p is not None else None for p in params]
    out = F.batch_norm(x.double(), rm, rv, w, b, training, momentum, eps)
    running = [(rm, rv)]
    if residual_params is not None:
        rrm, rrv, rw, rb = [p.detach().double().clone() for p in residual_params]
        out = out + F.batch_norm(residual.double(), rrm, rrv, rw, rb, training, momentum, eps)
        running.append((rrm, rrv))
    elif residual is not None:
        out = out + residual.double()
    return (torch.relu(out) if relu else out), running


def run_fused(kind, x, residual, params, residual_params, training, momentum, eps, relu):
    rm, rv, w, b = params
    if kind == "none":
        return FF.batch_norm_relu(x, rm, rv, w, b, training, momentum, eps, relu=relu)
    if kind == "add":
        return FF.batch_norm_add_relu(x, residual, rm, rv, w, b, training, momentum, eps, relu=relu)
    rrm, rrv, rw, rb = residual_params
    return FF.dual_batch_norm_add_relu(x, residual, rm, rv, rrm, rrv, w, b, rw, rb, training,
                                       momentum, eps, relu=relu)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "add", "dual"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_reference(target, layout, dtype, kind, relu, training):
    device = use(target)
    C = SHAPE[1]
    x = make(SHAPE, dtype, device, layout, scale=2.0, offset=0.5)
    residual = make(SHAPE, dtype, device, layout) if kind != "none" else None
    params = bn_params(C, torch.float32, device)
    residual_params = bn_params(C, torch.float32, device) if kind == "dual" else None
    ref, ref_running = reference_bn_act(x, residual, params, residual_params, training, 0.1,
                                        1e-5, relu)
    out = run_fused(kind, x, residual, params, residual_params, training, 0.1, 1e-5, relu)

    assert out.dtype == dtype and out.device == x.device
    assert has_layout(out, layout)
    assert_close(out, ref, dtype)
    # Running statistics: updated in training (unbiased variance), untouched in eval.
    fused_running = [params[:2]] + ([residual_params[:2]] if residual_params else [])
    for (rm, rv), (ref_rm, ref_rv) in zip(fused_running, ref_running):
        assert_close(rm, ref_rm, torch.float32)
        assert_close(rv, ref_rv, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "add", "dual"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(target, layout, dtype, kind, relu, training):
    check_backward(target, layout, dtype, kind, relu, training, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "add", "dual"])
def test_low_precision_parameter_gradients(target, dtype, kind):
    """A model cast to float16 / bfloat16 (its BN parameters too): the parameters' gradients
    come back in that dtype (the reduce's merge writes them so), within its rounding of the
    float64 reference."""
    check_backward(target, "channels_last", dtype, kind, True, True, dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("hw", [(3, 11), (5, 10), (6, 6), (7, 7), (8, 8), (3, 4)])
@pytest.mark.parametrize("kind", ["none", "dual"])
def test_channels_first_plane_lengths(target, hw, kind):
    """NCHW planes (H * W values of one sample and channel) of every length mod 8, in bfloat16:
    the CUDA kernels read each plane's whole 16-byte vectors at once and its clipped ends value
    by value (3x4: all values one by one); forward and gradients match the reference."""
    check_backward(target, "nchw", torch.bfloat16, kind, True, True, torch.float32,
                   shape=(3, 5, *hw), check_output=True)


def check_backward(target, layout, dtype, kind, relu, training, param_dtype, shape=SHAPE,
                   check_output=False):
    device = use(target)
    C = shape[1]
    x = make(shape, dtype, device, layout, scale=2.0, offset=0.5, requires_grad=True)
    residual = make(shape, dtype, device, layout, requires_grad=True) if kind != "none" else None
    params = bn_params(C, param_dtype, device, requires_grad=True)
    residual_params = bn_params(C, param_dtype, device, True) if kind == "dual" else None
    grad = make(shape, dtype, device, layout)

    out = run_fused(kind, x, residual, params, residual_params, training, 0.1, 1e-5, relu)
    if check_output:
        ref, _ = reference_bn_act(x, residual, params, residual_params, training, 0.1, 1e-5, relu)
        assert_close(out, ref, dtype)
    leaves = [x, params[2], params[3]]
    if residual is not None:
        leaves.append(residual)
    if residual_params is not None:
        leaves += [residual_params[2], residual_params[3]]
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_x, ref_w, ref_b = ref_leaves[:3]
    ref_res = ref_leaves[3] if residual is not None else None
    ref_res_params = None
    if residual_params is not None:
        ref_res_params = (residual_params[0], residual_params[1], ref_leaves[4], ref_leaves[5])
    ref_out = F.batch_norm(ref_x, params[0].double().clone(), params[1].double().clone(), ref_w,
                           ref_b, training, 0.1, 1e-5)
    if ref_res_params is not None:
        ref_out = ref_out + F.batch_norm(ref_res, ref_res_params[0].double().clone(),
                                         ref_res_params[1].double().clone(), ref_res_params[2],
                                         ref_res_params[3], training, 0.1, 1e-5)
    elif ref_res is not None:
        ref_out = ref_out + ref_res
    if relu:
        ref_out = torch.relu(ref_out)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())

    for name, g, ref_g, leaf in zip(["input", "weight", "bias", "residual", "residual_weight",
                                     "residual_bias"], grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype, name
        # Gradients of low-precision tensors are rounded once more than the output.
        assert_close(g, ref_g, dtype if g.dtype == dtype else torch.float32,
                     tolerance={**TOLERANCE, torch.float16: 4e-3, torch.bfloat16: 2e-2})


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "shape, training",
    [
        ((2, 3, 9, 9), True),  # C = 3
        ((5, 8, 1, 1), True),  # H = W = 1
        ((1, 8, 1, 1), False),  # N = 1 in eval: one value per channel is fine
        ((1, 4, 3, 3), True),  # N = 1 in training
        ((7, 5), True),  # (N, C) as BatchNorm1d
        ((2, 3, 4, 5, 6), True),  # 5-D
        ((3, 16, 8, 8), True),  # channels divisible by every vector width
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
def test_odd_shapes(target, shape, training, layout):
    device = use(target)
    if layout != "nchw" and len(shape) != 4:
        pytest.skip("layout needs a 4-D tensor")
    x = make(shape, torch.float32, device, layout, scale=3.0, offset=-1.0, requires_grad=True)
    residual = make(shape, torch.float32, device, layout, requires_grad=True)
    params = bn_params(shape[1], torch.float32, device, requires_grad=True)
    leaves = [x, residual, params[2], params[3]]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_rm, ref_rv = params[0].double(), params[1].double()
    ref = torch.relu(F.batch_norm(ref_leaves[0], ref_rm, ref_rv, *ref_leaves[2:], training)
                     + ref_leaves[1])
    out = FF.batch_norm_add_relu(x, residual, *params, training=training)
    assert_close(out, ref, torch.float32)
    assert_close(params[0], ref_rm, torch.float32)
    assert_close(params[1], ref_rv, torch.float32)
    grad = torch.rand_like(ref)
    grads = torch.autograd.grad(out, leaves, grad.float())
    for g, r in zip(grads, torch.autograd.grad(ref, ref_leaves, grad)):
        assert_close(g, r, torch.float32, {torch.float32: 1e-4})


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(target, training, layout):
    device = use(target)
    x = make((0, 4, 3, 3), torch.float32, device, layout, requires_grad=True)
    rm, rv, w, b = bn_params(4, torch.float32, device, requires_grad=True)
    rm_before, rv_before = rm.clone(), rv.clone()
    nbt = torch.tensor(0, device=device)
    out = FF.batch_norm_relu(x, rm, rv, w, b, training, num_batches_tracked=nbt)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape
    # As nn.BatchNorm2d: nothing to average, but the (empty) batch is counted.
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    assert nbt.item() == (1 if training else 0)


@pytest.mark.parametrize("target", TARGETS_AND_REFERENCE)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("kind", ["none", "add", "dual"])
@pytest.mark.parametrize("counter", ["int64", "float32"])
def test_running_stats_match_batchnorm2d(target, momentum, kind, counter):
    """Several steps against nn.BatchNorm2d modules, num_batches_tracked included. The ops
    update the statistics of an int64 counter (nn.BatchNorm2d's) in their own kernels; with
    any other counter the functional API's glue does it."""
    device = use(target)
    C = 5
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).to(device)
    bn_res = torch.nn.BatchNorm2d(C, momentum=momentum).to(device)
    dtype = {"int64": torch.int64, "float32": torch.float32}[counter]
    mine = {k: v.clone().to(dtype) if k == "num_batches_tracked" else v.clone()
            for k, v in bn.state_dict().items()}
    mine_res = {k: v.clone().to(dtype) if k == "num_batches_tracked" else v.clone()
                for k, v in bn_res.state_dict().items()}
    for step in range(4):
        x = make((3, C, 4, 4), torch.float32, device, scale=step + 1.0, offset=step)
        z = make((3, C, 4, 4), torch.float32, device, scale=2.0, offset=-step)
        ref = bn(x)
        if kind == "none":
            out = FF.batch_norm_relu(x, mine["running_mean"], mine["running_var"], bn.weight,
                                     bn.bias, True, momentum, bn.eps, relu=False,
                                     num_batches_tracked=mine["num_batches_tracked"])
        elif kind == "add":
            ref = ref + z
            out = FF.batch_norm_add_relu(x, z, mine["running_mean"], mine["running_var"],
                                         bn.weight, bn.bias, True, momentum, bn.eps, relu=False,
                                         num_batches_tracked=mine["num_batches_tracked"])
        else:
            ref = ref + bn_res(z)
            out = FF.dual_batch_norm_add_relu(
                x, z, mine["running_mean"], mine["running_var"], mine_res["running_mean"],
                mine_res["running_var"], bn.weight, bn.bias, bn_res.weight, bn_res.bias, True,
                momentum, bn.eps, relu=False, num_batches_tracked=mine["num_batches_tracked"],
                residual_num_batches_tracked=mine_res["num_batches_tracked"])
        assert_close(out, ref, torch.float32)
        for state, module in [(mine, bn)] + ([(mine_res, bn_res)] if kind == "dual" else []):
            for key, value in module.state_dict().items():
                if key == "num_batches_tracked":
                    assert state[key].item() == value.item() == step + 1
                elif "running" in key:
                    assert_close(state[key], value, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_and_stats(target, layout, dtype):
    """A model cast to bf16 has bf16 weights and running stats; the math stays in fp32."""
    device = use(target)
    x = make(SHAPE, dtype, device, layout)
    params = bn_params(SHAPE[1], dtype, device)
    ref, ref_running = reference_bn_act(x, None, params, None, True, 0.1, 1e-5, True)
    out = FF.batch_norm_relu(x, *params, training=True)
    assert_close(out, ref, dtype)
    assert params[0].dtype == params[1].dtype == dtype
    assert_close(params[0], ref_running[0][0], dtype)
    assert_close(params[1], ref_running[0][1], dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_large_mean_small_variance(target):
    """E[x^2] - E[x]^2 in float32 would lose every digit here (x^2 ~ 1e8 has an ulp of 8);
    the stable statistics keep the error at the input's own rounding (ulp(1e4) / std ~ 1e-3)."""
    device = use(target)
    for layout in LAYOUTS:
        x = make((8, 4, 16, 16), torch.float32, device, layout, scale=1.0, offset=1e4)
        params = bn_params(4, torch.float32, device)
        ref, ref_running = reference_bn_act(x, None, params, None, True, 0.1, 1e-5, False)
        out = FF.batch_norm_relu(x, *params, training=True, relu=False)
        assert_close(out, ref, torch.float32, tolerance={torch.float32: 1e-3})
        assert_close(params[1], ref_running[0][1], torch.float32, tolerance={torch.float32: 1e-3})


@pytest.mark.parametrize("target", TARGETS)
def test_strided_running_stats(target):
    """Running statistics that are views with a stride (the functional API takes any, as
    F.batch_norm does): the kernels write contiguous buffers only, so the functional API's
    glue updates these, in place in the viewed storage, as nn.BatchNorm2d would."""
    device = use(target)
    C = 5
    bn = torch.nn.BatchNorm2d(C).to(device)
    storage = torch.stack([bn.running_mean, bn.running_var], dim=1).clone()  # (C, 2)
    running_mean, running_var = storage[:, 0], storage[:, 1]
    assert not running_mean.is_contiguous()
    x = make((3, C, 4, 4), torch.float32, device)
    out = FF.batch_norm_relu(x, running_mean, running_var, bn.weight, bn.bias, True, relu=False,
                             num_batches_tracked=torch.tensor(0, device=device))
    assert_close(out, bn(x), torch.float32)
    assert_close(storage[:, 0], bn.running_mean, torch.float32)
    assert_close(storage[:, 1], bn.running_var, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_no_running_stats_in_training(target):
    """track_running_stats=False: batch statistics only."""
    device = use(target)
    x = make(SHAPE, torch.float32, device)
    out = FF.batch_norm_relu(x, None, None, training=True)
    assert_close(out, torch.relu(F.batch_norm(x.double(), None, None, training=True)),
                 torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_propagates(target):
    device = use(target)
    x = make((2, 3, 4, 4), torch.float32, device)
    x[0, 1, 2, 2] = float("nan")
    params = bn_params(3, torch.float32, device)
    out = FF.batch_norm_relu(x, *params, training=False)
    ref = torch.relu(F.batch_norm(x, *params, training=False))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 1, 2, 2])


@pytest.mark.parametrize("target", TARGETS)
def test_eval_graph_survives_a_later_running_stats_update(target):
    """Eval forward, then a training step updating the same running statistics in place, then
    the eval backward: works as with F.batch_norm (the eval op must not save the buffer)."""
    device = use(target)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    x = make((4, 3, 5, 5), device=device, requires_grad=True)
    out = FF.batch_norm_relu(x, rm, rv, training=False)
    FF.batch_norm_relu(make((4, 3, 5, 5), device=device), rm, rv, training=True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().double().requires_grad_()
    ref = torch.relu(F.batch_norm(x_ref, torch.zeros(3).double().to(device),
                                  torch.ones(3).double().to(device)))
    (grad_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    assert_close(grad, grad_ref, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("values", [["inf"], ["-inf"], ["nan"], ["inf", "-inf"]],
                         ids=lambda v: "_".join(v))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_training_inf_nan_propagate_as_pytorch(target, layout, values, where):
    """An Inf / NaN in a training batch, also as a channel's very first value (the statistics'
    shift): the channel's output and running_var (NaN) as F.batch_norm, its running_mean not
    finite; the other channels are untouched. (Whether that mean is +-Inf or NaN is not
    pinned: PyTorch gives Inf on the CPU, and NaN or Inf on a GPU by where the value sits in
    its merge order; either poisons the channel alike.)"""
    device = use(target)
    x = make((3, 4, 5, 6), device=device, layout=layout)
    c = 2
    spots = {"first": [(0, c, 0, 0), (0, c, 0, 1)], "middle": [(1, c, 2, 3), (1, c, 4, 1)],
             "last": [(2, c, 4, 5), (2, c, 4, 4)]}[where]
    for value, spot in zip(values, spots):
        x[spot] = float(value)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_ref, rv_ref = rm.double(), rv.double()
    out = FF.batch_norm_relu(x, rm, rv, training=True)
    ref = torch.relu(F.batch_norm(x.double(), rm_ref, rv_ref, training=True))
    finite = rm_ref.isfinite()
    for got, expected in ((out, ref), (rm[finite], rm_ref[finite]), (rv, rv_ref)):
        torch.testing.assert_close(got.double(), expected, equal_nan=True, rtol=1e-4, atol=1e-5)
    assert torch.equal(rm.isfinite(), finite)
    assert not rm[c].isfinite() and rv[c].isnan()


@pytest.mark.parametrize("target", TARGETS_AND_REFERENCE)
@pytest.mark.parametrize("momenta", [(0.1, 0.6), (None, None)], ids=["ema", "cumulative"])
@pytest.mark.parametrize("counter", [torch.int64, torch.float32], ids=["int64", "float32"])
def test_dual_form_keeps_the_shortcut_bn_its_own(target, momenta, counter):
    """The dual form against two nn.BatchNorm2d modules whose eps, momentum and counters all
    differ (the shortcut's eps 1e-2 against 1e-5; the shortcut's counter starting at 7): output,
    both running statistics, both counters, and the gradients of input, residual and both
    affines, in training and then in eval. With float32 counters (which the ops do not take)
    the functional API's glue updates the running statistics."""
    device = use(target)
    C, momentum, residual_momentum = 5, *momenta
    bn = torch.nn.BatchNorm2d(C, eps=1e-5, momentum=momentum).to(device).double()
    bn_res = torch.nn.BatchNorm2d(C, eps=1e-2, momentum=residual_momentum).to(device).double()
    with torch.no_grad():
        for m in (bn, bn_res):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        bn_res.running_var.fill_(0.02)  # where eps 1e-2 against 1e-5 shows
        bn_res.num_batches_tracked.fill_(7)
    mine = [{k: v.clone().float() if v.is_floating_point() else v.clone().to(counter)
             for k, v in m.state_dict().items()} for m in (bn, bn_res)]
    params = [(m.weight.detach().float().requires_grad_(), m.bias.detach().float().requires_grad_())
              for m in (bn, bn_res)]
    for training in (True, True, False):
        for m in (bn, bn_res):
            m.train(training)
        x = make((3, C, 4, 4), torch.float32, device, scale=2.0, offset=1.0, requires_grad=True)
        z = make((3, C, 4, 4), torch.float32, device, scale=0.1, offset=-1.0, requires_grad=True)
        x64, z64 = (t.detach().double().requires_grad_() for t in (x, z))
        ref = torch.relu(bn(x64) + bn_res(z64))
        out = FF.dual_batch_norm_add_relu(
            x, z, mine[0]["running_mean"], mine[0]["running_var"], mine[1]["running_mean"],
            mine[1]["running_var"], *params[0], *params[1], training, momentum, bn.eps,
            residual_momentum=residual_momentum, residual_eps=bn_res.eps,
            num_batches_tracked=mine[0]["num_batches_tracked"],
            residual_num_batches_tracked=mine[1]["num_batches_tracked"])
        assert_close(out, ref, torch.float32)
        grad = torch.rand_like(ref)
        ref_grads = torch.autograd.grad(ref, [x64, z64, bn.weight, bn.bias, bn_res.weight,
                                              bn_res.bias], grad)
        grads = torch.autograd.grad(out, [x, z, *params[0], *params[1]], grad.float())
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, torch.float32, {torch.float32: 1e-4})
        for state, module in zip(mine, (bn, bn_res)):
            for key, value in module.state_dict().items():
                if key == "num_batches_tracked":
                    assert state[key].item() == value.item(), key
                elif "running" in key:
                    assert_close(state[key], value, torch.float32)


@pytest.mark.parametrize("target", TARGETS_AND_REFERENCE)
@pytest.mark.parametrize("training", [True, False])
def test_momentum_none_with_nothing_to_average(target, training):
    """momentum=None in eval, or in training without running statistics, is accepted (as by
    nn.BatchNorm2d(momentum=None)): there is nothing to average."""
    device = use(target)
    x = make(SHAPE, torch.float32, device)
    params = bn_params(SHAPE[1], torch.float32, device)
    running = params[:2] if not training else (None, None)
    out = FF.batch_norm_relu(x, *running, *params[2:], training=training, momentum=None)
    ref = torch.relu(F.batch_norm(x.double(), *[t.double() if t is not None else None
                                               for t in running],
                                  params[2].double(), params[3].double(), training))
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("target", TARGETS_AND_REFERENCE)
def test_cumulative_average_in_float64(target):
    """momentum=None over 50 steps in float64: the running statistics within 1e-12 of
    nn.BatchNorm2d(momentum=None).double() (the factor 1 / count must be a double: a float
    factor drifted by 4.5e-8)."""
    device = use(target)
    bn = torch.nn.BatchNorm2d(3, momentum=None).double().to(device)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for step in range(50):
        x = make((2, 3, 4, 4), torch.float64, device, scale=step + 1.0, offset=step)
        out = FF.batch_norm_relu(x, rm, rv, bn.weight, bn.bias, True, None, bn.eps, relu=False,
                                 num_batches_tracked=nbt)
        assert_close(out, bn(x), torch.float64)
    assert nbt.item() == bn.num_batches_tracked.item() == 50
    assert_close(rm, bn.running_mean, torch.float64, {torch.float64: 1e-12})
    assert_close(rv, bn.running_var, torch.float64, {torch.float64: 1e-12})
