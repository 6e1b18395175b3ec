"""Folded inference: fold_conv_bn, conv_bias_relu and conv_bias_add_relu against an eval-mode
conv + BatchNorm (+ residual) + ReLU in fp64."""
import pytest
import torch
import torch.nn.functional as F

import fusedres.functional as FF
from conftest import (NATIVE_TARGETS, CONV_TOLERANCE, DTYPES, LAYOUTS, assert_close, make,
                      has_layout, use)

# (C_in, C_out, kernel, stride, padding, groups): the kinds of convolution in ResNets.
CONVS = [
    (8, 16, 1, 1, 0, 1),
    (8, 8, 3, 1, 1, 1),
    (8, 16, 3, 2, 1, 1),
    (3, 8, 7, 2, 3, 1),  # stem
    (16, 16, 3, 1, 1, 4),  # ResNeXt grouped conv
    (8, 16, 1, 2, 0, 1),  # projection shortcut
]


def eval_bn(C, device="cpu"):
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    w = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(C, dtype=torch.float64, device=device)
    return rm, rv, w, b


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_conv_bn_matches_conv_then_bn(target, dtype, conv_bias):
    device = use(target)
    weight = make((16, 8, 3, 3), dtype, device)
    bias = make((16,), dtype, device) if conv_bias else None
    rm, rv, w, b = [t.float() for t in eval_bn(16, device)]  # BN in float32, as in a model
    fw, fb = FF.fold_conv_bn(weight, bias, rm, rv, 1e-5, w, b)
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == weight.shape
    x = make((2, 8, 6, 6), torch.float64, device)
    ref = F.batch_norm(F.conv2d(x, weight.double(), bias.double() if conv_bias else None, padding=1),
                       rm.double(), rv.double(), w.double(), b.double(), False, 0.0, 1e-5)
    out = F.conv2d(x, fw.double(), fb.double(), padding=1)
    assert_close(out, ref, dtype, CONV_TOLERANCE)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_fold_conv_bn_keeps_weight_layout_and_optional_affine(target):
    device = use(target)
    weight = make((4, 2, 3, 3), torch.float32, device, "channels_last")
    rm, rv, _, _ = eval_bn(4, device)
    fw, fb = FF.fold_conv_bn(weight, None, rm.float(), rv.float(), 1e-3, None, None)
    assert has_layout(fw, "channels_last")
    scale = torch.rsqrt(rv + 1e-3)
    assert_close(fw, weight.double() * scale.view(-1, 1, 1, 1), torch.float32)
    assert_close(fb, -rm * scale, torch.float32)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv_bias_act_matches_reference(target, dtype, layout, conv, with_residual):
    device = use(target)
    if device == "cpu" and dtype == torch.float16 and conv[5] > 1:
        pytest.skip("PyTorch has no grouped float16 convolution on the CPU")
    cin, cout, k, stride, padding, groups = conv
    x = make((2, cin, 9, 9), dtype, device, layout)
    weight = make((cout, cin // groups, k, k), dtype, device, scale=0.3)
    bias = make((cout,), torch.float32, device)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, 1, groups)
    residual = make(tuple(ref.shape), dtype, device, layout) if with_residual else None
    if with_residual:
        ref = ref + residual.double()
        out = FF.conv_bias_add_relu(x, weight, bias, residual, stride, padding, 1, groups)
    else:
        out = FF.conv_bias_relu(x, weight, bias, stride, padding, 1, groups)
    ref = torch.relu(ref)
    assert out.dtype == dtype
    assert has_layout(out, layout)
    assert_close(out, ref, dtype, CONV_TOLERANCE)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv_bias_act_backward(target, with_residual):
    device = use(target)
    x = make((2, 4, 6, 6), torch.float32, device, requires_grad=True)
    weight = make((6, 4, 3, 3), torch.float32, device, scale=0.3, requires_grad=True)
    bias = make((6,), torch.float32, device, requires_grad=True)
    residual = make((2, 6, 6, 6), torch.float32, device, requires_grad=True)
    leaves = [x, weight, bias] + ([residual] if with_residual else [])
    if with_residual:
        out = FF.conv_bias_add_relu(x, weight, bias, residual, 1, 1)
    else:
        out = FF.conv_bias_relu(x, weight, bias, 1, 1)
    grad = make(tuple(out.shape), torch.float32, device)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], 1, 1)
    if with_residual:
        ref = ref + ref_leaves[3]
    ref_grads = torch.autograd.grad(torch.relu(ref), ref_leaves, grad.double())
    for g, ref_g in zip(grads, ref_grads):
        assert_close(g, ref_g, torch.float32, CONV_TOLERANCE)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_conv_bias_act_empty_batch_and_no_bias(target):
    device = use(target)
    x = make((0, 4, 5, 5), torch.float32, device)
    weight = make((8, 4, 3, 3), torch.float32, device)
    out = FF.conv_bias_relu(x, weight, None, 1, 1)
    assert out.shape == (0, 8, 5, 5)
    x = make((2, 4, 5, 5), torch.float32, device)
    out = FF.conv_bias_relu(x, weight, None, 1, 1)
    assert_close(out, torch.relu(F.conv2d(x.double(), weight.double(), None, 1, 1)), torch.float32,
                 CONV_TOLERANCE)


@pytest.mark.parametrize("target", NATIVE_TARGETS)
@pytest.mark.parametrize("weight_layout", LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_follows_the_input_strides_without_copying_the_weight(target, layout,
                                                                     weight_layout):
    """The last stage of a ResNet at 32x32 is N x C x 1 x 1, which is dense in both layouts:
    the output format comes from the input's actual strides as PyTorch's suggest_memory_format
    decides it, its strides are exactly the fake kernel's, and a weight in the input's layout
    is never copied per call (a mixed pair is copied as F.conv2d copies it)."""
    device = use(target)
    x = make((4, 64, 1, 1), layout=layout, device=device)
    weight = make((64, 64, 3, 3), layout=weight_layout, device=device)
    bias, residual = make((64,), device=device), make((4, 64, 1, 1), device=device)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = FF.conv_bias_add_relu(x, weight, bias, residual, 1, 1)
        plain = FF.conv_bias_relu(x, weight, bias, 1, 1)
    copies = [e for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone") and [64, 64, 3, 3] in e.input_shapes]
    if layout == weight_layout:
        assert not copies, [e.name for e in copies]
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    assert_close(out, torch.relu(ref + residual.double()), torch.float32, CONV_TOLERANCE)
    assert_close(plain, torch.relu(ref), torch.float32, CONV_TOLERANCE)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.fusedres.conv_bias_relu(mode.from_tensor(x), mode.from_tensor(weight),
                                                 mode.from_tensor(bias), [1, 1], [1, 1],
                                                 [1, 1], 1)
    expected = (64, 1, 64, 64) if layout == "channels_last" else (64, 1, 1, 1)
    for t in (out, plain):
        assert t.stride() == fake.stride() == expected, (t.stride(), fake.stride())
