"""add_relu: relu(input + residual) in one pass, against the unfused computation."""
import pytest
import torch

import fusedres.functional as FF
from conftest import TARGETS, DTYPES, LAYOUTS, assert_close, make, has_layout, use


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (2, 3, 1, 1), (0, 4, 2, 2)])
def test_add_relu_matches_reference(target, dtype, layout, shape):
    device = use(target)
    x = make(shape, dtype, device, layout, requires_grad=True)
    z = make(shape, dtype, device, layout, requires_grad=True)
    out = FF.add_relu(x, z)
    ref = torch.relu(x.double() + z.double())
    assert out.dtype == dtype
    if out.numel():
        assert has_layout(out, layout)
        assert_close(out, ref, dtype)
    grad = make(shape, dtype, device, layout)
    gx, gz = torch.autograd.grad(out, (x, z), grad)
    ref_g = grad.double() * (ref > 0)
    if out.numel():
        assert_close(gx, ref_g, dtype)
        assert_close(gz, ref_g, dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_add_relu_mixed_layouts(target):
    """A channels_last input with an NCHW residual: output follows the input."""
    device = use(target)
    x = make((2, 16, 4, 4), torch.float32, device, "channels_last")
    z = make((2, 16, 4, 4), torch.float32, device, "nchw")
    out = FF.add_relu(x, z)
    assert has_layout(out, "channels_last")
    assert_close(out, torch.relu(x.double() + z.double()), torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_add_relu_keeps_nan(target):
    device = use(target)
    x = make((2, 3, 4, 4), torch.float32, device)
    x[1, 2, 3, 0] = float("nan")
    out = FF.add_relu(x, torch.zeros_like(x) - 5)
    assert torch.isnan(out[1, 2, 3, 0]) and not torch.isnan(out).sum() > 1
