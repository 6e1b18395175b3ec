"""add_batch_norm_relu: (sum, relu(bn(sum))) with sum = input + residual, the pre-activation
block's add fused with the next BN + ReLU, against the unfused computation: the sum bit for
bit as PyTorch's add, the output, running statistics and gradients in fp64."""
import pytest
import torch
import torch.nn.functional as F

import fusedres.functional as FF
from conftest import (DTYPES, LAYOUTS, TARGETS, TARGETS_AND_REFERENCE, assert_close, has_layout,
                      make, use)
from test_batch_norm import bn_params

SHAPE = (4, 6, 5, 7)  # odd spatial sizes: no vector path hides a tail bug


def reference(x, z, params, training, momentum, eps, relu):
    """The unfused computation: the add in x's dtype (as a model runs it), the BN + ReLU of
    the sum in fp64, on copies of the running statistics."""
    total = x + z
    rm, rv, w, b = [p.detach().double().clone() if p is not None else None for p in params]
    out = F.batch_norm(total.double(), rm, rv, w, b, training, momentum, eps)
    return total, (torch.relu(out) if relu else out), (rm, rv)


@pytest.mark.parametrize("target", TARGETS_AND_REFERENCE)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_reference(target, layout, dtype, relu, training):
    device = use(target)
    # A large mean: the statistics are taken of the rounded sum, not of x and z apart.
    x = make(SHAPE, dtype, device, layout, scale=2.0, offset=60.0)
    z = make(SHAPE, dtype, device, layout, scale=0.7)
    params = bn_params(SHAPE[1], torch.float64 if dtype == torch.float64 else torch.float32,
                       device)
    ref_total, ref_out, (ref_rm, ref_rv) = reference(x, z, params, training, 0.1, 1e-5, relu)
    total, out = FF.add_batch_norm_relu(x, z, *params, training, 0.1, 1e-5, relu=relu)

    assert torch.equal(total, ref_total)  # rounded as the add rounds, bit for bit
    assert has_layout(total, layout) and has_layout(out, layout)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert_close(params[0], ref_rm, params[0].dtype)
    assert_close(params[1], ref_rv, params[1].dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("sum_used", [True, False], ids=["sum-used", "sum-unused"])
def test_backward_matches_reference(target, layout, dtype, relu, sum_used):
    """The gradient of input and residual is the BN + ReLU's plus, where the sum is used
    further (the next shortcut), the sum's own; weight and bias get the BN's."""
    device = use(target)
    x = make(SHAPE, dtype, device, layout, scale=2.0, offset=0.5, requires_grad=True)
    z = make(SHAPE, dtype, device, layout, requires_grad=True)
    params = bn_params(SHAPE[1], torch.float64 if dtype == torch.float64 else torch.float32,
                       device, requires_grad=True)
    grad_out = make(SHAPE, dtype, device, layout)
    grad_sum = make(SHAPE, dtype, device, layout, scale=0.5)

    total, out = FF.add_batch_norm_relu(x, z, *params, True, 0.1, 1e-5, relu=relu)
    outputs, grads = ([out, total], [grad_out, grad_sum]) if sum_used else ([out], [grad_out])
    leaves = [x, z, params[2], params[3]]
    got = torch.autograd.grad(outputs, leaves, grads)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rz, rw, rb = ref_leaves
    # The sum as the add rounds it (a constant correction: its gradient is the exact sum's).
    ref_total = rx + rz
    ref_total = ref_total + ((x + z).double() - ref_total).detach()
    ref_out = F.batch_norm(ref_total, None, None, rw, rb, True, 0.1, 1e-5)
    ref_out = torch.relu(ref_out) if relu else ref_out
    ref_outputs = [ref_out, ref_total] if sum_used else [ref_out]
    expected = torch.autograd.grad(ref_outputs, ref_leaves, [g.double() for g in grads])
    for name, g, e, leaf in zip(["input", "residual", "weight", "bias"], got, expected, leaves):
        assert g.dtype == leaf.dtype, name
        assert has_layout(g, layout) or g.dim() == 1, name
        # Gradients of low-precision tensors are rounded once more than the output.
        assert_close(g, e, g.dtype if g.dtype == dtype else torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_mixed_layouts(target):
    """A channels_last input with an NCHW residual (or the reverse): the sum takes the input's
    layout, values as the add's."""
    device = use(target)
    x = make(SHAPE, torch.float32, device, "channels_last", requires_grad=True)
    z = make(SHAPE, torch.float32, device, "nchw", requires_grad=True)
    params = bn_params(SHAPE[1], torch.float32, device)
    for a, b in ((x, z), (z, x)):
        total, out = FF.add_batch_norm_relu(a, b, *params, True)
        ref_total, ref_out, _ = reference(a.detach(), b.detach(), params, True, 0.1, 1e-5, True)
        assert torch.equal(total, ref_total)
        assert total.stride() == a.contiguous(
            memory_format=torch.channels_last if a is x else torch.contiguous_format).stride()
        assert_close(out, ref_out, torch.float32)
        (out.sum() + total.sum()).backward()
        assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("target", TARGETS)
def test_empty_batch(target):
    device = use(target)
    x = make((0, 4, 3, 3), torch.float32, device, requires_grad=True)
    z = make((0, 4, 3, 3), torch.float32, device)
    rm, rv, w, b = bn_params(4, torch.float32, device, requires_grad=True)
    rm_before = rm.clone()
    nbt = torch.tensor(0, device=device)
    total, out = FF.add_batch_norm_relu(x, z, rm, rv, w, b, True, num_batches_tracked=nbt)
    assert total.shape == out.shape == x.shape
    (out.sum() + total.sum()).backward()
    assert x.grad.shape == x.shape
    assert torch.equal(rm, rm_before) and nbt.item() == 1  # counted, nothing averaged


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inf_nan_propagate_as_pytorch(target, layout):
    """inf + (-inf) in the sum is NaN, as the add gives; the statistics of its channel are
    NaN; a channel with one Inf gets a running_mean that is not finite (Inf or NaN, as PyTorch's
    own varies between devices) and a NaN running_var; the other channels are unaffected."""
    device = use(target)
    x = make(SHAPE, torch.float32, device, layout)
    z = make(SHAPE, torch.float32, device, layout)
    x[1, 2, 3, 4] = float("inf")
    z[1, 2, 3, 4] = float("-inf")
    x[0, 4, 0, 0] = float("inf")
    params = bn_params(SHAPE[1], torch.float32, device)
    ref_total, ref_out, (ref_rm, ref_rv) = reference(x, z, params, True, 0.1, 1e-5, True)
    total, out = FF.add_batch_norm_relu(x, z, *params, True)
    assert torch.equal(total.isnan(), ref_total.isnan())
    assert torch.equal(total.nan_to_num(), ref_total.nan_to_num())
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(params[0].isfinite(), ref_rm.isfinite())
    assert params[0][2].isnan() and not params[0][4].isfinite()
    finite = ref_rm.isfinite()
    assert_close(params[0][finite], ref_rm[finite], torch.float32)
    assert torch.equal(params[1].isnan(), ref_rv.isnan())
    finite = ~ref_out.isnan()
    assert_close(out[finite], ref_out[finite], torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_bad_residual_is_refused(target):
    device = use(target)
    x = make(SHAPE, torch.float32, device)
    params = bn_params(SHAPE[1], torch.float32, device)
    with pytest.raises(ValueError, match="residual must have the shape of input"):
        FF.add_batch_norm_relu(x, x[:, :, :4], *params, True)
    with pytest.raises(TypeError, match="residual must have the dtype of input"):
        FF.add_batch_norm_relu(x, x.double(), *params, True)
