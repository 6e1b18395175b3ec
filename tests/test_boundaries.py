"""The fused BN ops across the kernels' tiling boundaries, against float64: channel counts
beyond one channel block (the Triton tile is 32 channels in the interpreter, so C = 40 and 80
span two and three blocks), and row counts beyond one reduction block that are not a multiple
of it (the C++ channels_last sums run in 256-row blocks, its statistics in 128-row blocks;
Triton splits the rows over several programs and merges their partials). Outputs, both
running statistics, both counters and every gradient, in both layouts, on every backend."""
import pytest
import torch

import fusedres
import fusedres.functional as FF
from conftest import LAYOUTS, TARGETS, assert_close, has_layout, make, use

SHAPES = [
    (3, 40, 7, 7),  # 2 channel blocks; 147 rows: 4 Triton reduction programs
    (3, 80, 7, 7),  # 3 channel blocks
    (3, 5, 10, 11),  # 330 rows: two 256-row blocks (C++ channels_last), three of 128
]
# The shortcut BN's eps, momentum and counter differ from the main BN's (the dual form must
# keep them apart); its running_var is small so that an eps mix-up shows.
MAIN = dict(eps=1e-5, momentum=0.1, counter=0)
SHORTCUT = dict(eps=1e-2, momentum=0.6, counter=7)


def bn(C, device, config):
    module = torch.nn.BatchNorm2d(C, eps=config["eps"], momentum=config["momentum"])
    module = module.double().to(device)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.01, 0.05)
        module.num_batches_tracked.fill_(config["counter"])
    return module


def float_state(module):
    """(running_mean, running_var, counter, weight, bias) for the fused op, in float32."""
    return (module.running_mean.float(), module.running_var.float(),
            module.num_batches_tracked.clone(),
            module.weight.detach().float().requires_grad_(),
            module.bias.detach().float().requires_grad_())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["none", "add", "dual"])
@pytest.mark.parametrize("training", [True, False])
def test_bn_ops_across_blocks(target, shape, layout, kind, training):
    device = use(target)
    C = shape[1]
    main, shortcut = bn(C, device, MAIN), bn(C, device, SHORTCUT)
    main.train(training)
    shortcut.train(training)
    rm, rv, nbt, w, b = float_state(main)
    rrm, rrv, rnbt, rw, rb = float_state(shortcut)
    x = make(shape, torch.float32, device, layout, scale=2.0, offset=1.0, requires_grad=True)
    z = make(shape, torch.float32, device, layout, scale=0.5, offset=-1.0, requires_grad=True)
    x64, z64 = (t.detach().double().requires_grad_() for t in (x, z))

    if kind == "none":
        out = FF.batch_norm_relu(x, rm, rv, w, b, training, MAIN["momentum"], MAIN["eps"],
                                 num_batches_tracked=nbt)
        ref = torch.relu(main(x64))
        leaves, ref_leaves = [x, w, b], [x64, main.weight, main.bias]
    elif kind == "add":
        out = FF.batch_norm_add_relu(x, z, rm, rv, w, b, training, MAIN["momentum"],
                                     MAIN["eps"], num_batches_tracked=nbt)
        ref = torch.relu(main(x64) + z64)
        leaves, ref_leaves = [x, w, b, z], [x64, main.weight, main.bias, z64]
    else:
        out = FF.dual_batch_norm_add_relu(
            x, z, rm, rv, rrm, rrv, w, b, rw, rb, training, MAIN["momentum"], MAIN["eps"],
            residual_momentum=SHORTCUT["momentum"], residual_eps=SHORTCUT["eps"],
            num_batches_tracked=nbt, residual_num_batches_tracked=rnbt)
        ref = torch.relu(main(x64) + shortcut(z64))
        leaves = [x, w, b, z, rw, rb]
        ref_leaves = [x64, main.weight, main.bias, z64, shortcut.weight, shortcut.bias]

    assert has_layout(out, layout)
    assert_close(out, ref, torch.float32)
    grad = torch.rand_like(ref)
    grads = torch.autograd.grad(out, leaves, grad.float())
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, r in zip(["input", "weight", "bias", "residual", "residual_weight",
                           "residual_bias"], grads, ref_grads):
        assert has_layout(g, layout) or g.dim() == 1, name
        assert_close(g, r, torch.float32, {torch.float32: 1e-4})
    states = [((rm, rv, nbt), main)] + ([((rrm, rrv, rnbt), shortcut)] if kind == "dual" else [])
    for (mean, var, counter), module in states:
        assert_close(mean, module.running_mean, torch.float32)
        assert_close(var, module.running_var, torch.float32)
        assert counter.item() == module.num_batches_tracked.item()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_kernels_across_blocks(target, layout):
    """The two backward kernels on their own (op level), with the ReLU mask, against the
    float64 formulas: sum(g), sum(g * xhat), and the input gradient."""
    device = use(target)
    ops = fusedres._backend.op_library(target[0])
    for shape in SHAPES:
        C = shape[1]
        x = make(shape, torch.float32, device, layout, scale=2.0, offset=1.0)
        g = make(shape, torch.float32, device, layout)
        y = make(shape, torch.float32, device, layout)  # the mask: where y > 0
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + 1e-5)
        weight = torch.rand(C, dtype=torch.float64, device=device) + 0.5
        sum_dy, sum_dy_xhat, masked_grad, *_ = ops.batch_norm_backward_reduce(
            g, y, x, mean.float(), invstd.float(), True)
        masked = torch.where(y.double() > 0, g.double(), 0.0)
        xhat = (x.double() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        ref_sum_dy = masked.sum((0, 2, 3))
        ref_sum_dy_xhat = (masked * xhat).sum((0, 2, 3))
        assert_close(sum_dy, ref_sum_dy, torch.float32)
        assert_close(sum_dy_xhat, ref_sum_dy_xhat, torch.float32)
        assert has_layout(masked_grad, layout) and torch.equal(masked_grad, masked.float())
        grad_input = ops.batch_norm_backward_input(g, y, x, mean.float(), invstd.float(),
                                                   weight.float(), ref_sum_dy.float(),
                                                   ref_sum_dy_xhat.float())
        M = x.numel() // C
        k = (weight * invstd).view(1, -1, 1, 1)
        ref_input = k * (masked - ref_sum_dy.view(1, -1, 1, 1) / M
                         - xhat * ref_sum_dy_xhat.view(1, -1, 1, 1) / M)
        assert has_layout(grad_input, layout)
        assert_close(grad_input, ref_input, torch.float32, {torch.float32: 1e-4})


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_recomputed_relu_mask_is_the_outputs(target, layout, dtype):
    """The backward kernels recompute the ReLU mask from input with the forward's scale and
    shift: bit for bit the mask of the output the training forward wrote, where values sit
    at zero, round to zero in the output's dtype, or are NaN / Inf."""
    device = use(target)
    ops = fusedres._backend.op_library(target[0])
    for shape in SHAPES:
        C = shape[1]
        x = make(shape, dtype, device)
        flat = x.view(-1)
        flat[::7] = 0.0
        flat[5], flat[11], flat[13] = float("nan"), float("inf"), float("-inf")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.rand(C, device=device) + 0.5
        bias = torch.randn(C, device=device) * 0.1
        # channel 1: float subnormal outputs, some of which round to zero in bfloat16
        weight[1], bias[1] = 1e-40, 0.0
        out, mean, _, invstd, scale, shift = ops.batch_norm_act_train(x, weight, bias, None,
                                                                      1e-5, True)
        g = make(shape, dtype, device, layout)
        by_output = ops.batch_norm_backward_reduce(g, out, x, mean, invstd, True)
        recomputed = ops.batch_norm_backward_reduce(g, None, x, mean, invstd, True, scale, shift)
        assert torch.equal(by_output[2], recomputed[2])  # the masked gradient: the mask itself
        for a, b in zip(by_output[:2], recomputed[:2]):  # (NaN in the channels with NaN / Inf)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        args = (mean, invstd, weight, *by_output[:2])
        torch.testing.assert_close(ops.batch_norm_backward_input(g, out, x, *args),
                                   ops.batch_norm_backward_input(g, None, x, *args, scale, shift),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_across_blocks(target, layout):
    """batch_norm_stats: the per-channel mean and biased variance over many row blocks."""
    device = use(target)
    ops = fusedres._backend.op_library(target[0])
    for shape in SHAPES:
        x = make(shape, torch.float32, device, layout, scale=3.0, offset=2.0)
        mean, var = ops.batch_norm_stats(x)
        ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        assert_close(mean, ref_mean, torch.float32)
        assert_close(var, ref_var, torch.float32)
