"""The Triton convolution (fused_conv2d, and conv_bias_relu / conv_bias_add_relu on the triton
backend): every prologue / epilogue combination on the convolutions of ResNets, against the
unfused computation in float64, gradients included. Small shapes: on the CPU these run in the
Triton interpreter."""
import pytest
import torch
import torch.nn.functional as F

import fusedres.functional as FF
from conftest import CONV_TOLERANCE, HAS_CUDA, assert_close, has_layout, make, use

TRITON_TARGETS = [
    pytest.param(("triton", "cpu"), id="triton-interpreter", marks=pytest.mark.triton),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.triton]),
]
# bf16 matrix products are wrong in the interpreter: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# (C_in, C_out, kernel, stride, padding, groups)
CONVS = [
    (8, 16, 1, 1, 0, 1),  # bottleneck 1x1
    (8, 8, 3, 1, 1, 1),  # 3x3
    (8, 16, 3, 2, 1, 1),  # strided 3x3
    (3, 8, 7, 2, 3, 1),  # stem
    (16, 16, 3, 1, 1, 4),  # ResNeXt grouped
    (8, 16, 1, 2, 0, 1),  # projection shortcut
    (5, 7, 3, 1, 1, 1),  # odd channel counts
]
# (prologue, bias, residual, relu, stats)
COMBOS = {
    "plain": (False, False, False, False, False),
    "bias_relu": (False, True, False, True, False),
    "bias_add_relu": (False, True, True, True, False),
    "bn_prologue_stats": (True, False, False, False, True),
    "all": (True, True, True, True, True),
}


def reference(x, w, b, z, scale, shift, conv, relu):
    _, _, _, stride, padding, groups = conv
    a = x.double()
    if scale is not None:
        a = torch.relu(a * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    out = F.conv2d(a, w.double(), b.double() if b is not None else None, stride, padding, 1, groups)
    if z is not None:
        out = out + z.double()
    return torch.relu(out) if relu else out


def inputs(conv, dtype, device, layout, combo, batch=2, requires_grad=False):
    cin, cout, k, stride, padding, groups = conv
    prologue, bias, residual, _, _ = COMBOS[combo]
    x = make((batch, cin, 9, 9), dtype, device, layout, requires_grad=requires_grad)
    w = make((cout, cin // groups, k, k), dtype, device, scale=0.3, requires_grad=requires_grad)
    b = make((cout,), torch.float32, device, requires_grad=requires_grad) if bias else None
    scale = shift = None
    if prologue:
        scale = (torch.rand(cin, device=device) + 0.5).requires_grad_(requires_grad)
        shift = make((cin,), torch.float32, device, requires_grad=requires_grad)
    z = None
    if residual:
        p = (9 + 2 * padding - k) // stride + 1
        z = make((batch, cout, p, p), dtype, device, layout, requires_grad=requires_grad)
    return x, w, b, z, scale, shift


def run(conv, x, w, b, z, scale, shift, combo):
    _, _, _, stride, padding, groups = conv
    _, _, _, relu, stats = COMBOS[combo]
    return FF.fused_conv2d(x, w, b, stride, padding, 1, groups, input_scale=scale,
                           input_shift=shift, residual=z, relu=relu, return_stats=stats)


@pytest.mark.parametrize("target", TRITON_TARGETS)
@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(target, combo, conv, layout, dtype):
    device = use(target)
    x, w, b, z, scale, shift = inputs(conv, dtype, device, layout, combo)
    result = run(conv, x, w, b, z, scale, shift, combo)
    ref = reference(x, w, b, z, scale, shift, conv, COMBOS[combo][3])
    out = result[0] if COMBOS[combo][4] else result
    assert out.dtype == dtype and has_layout(out, layout)
    assert_close(out, ref, dtype, CONV_TOLERANCE)
    if COMBOS[combo][4]:  # statistics of the stored output, float32
        _, mean, var = result
        stored = out.double()
        assert mean.dtype == torch.float32 and var.dtype == torch.float32
        assert_close(mean, stored.mean((0, 2, 3)), torch.float32)
        assert_close(var, stored.var((0, 2, 3), unbiased=False), torch.float32)


@pytest.mark.parametrize("target", TRITON_TARGETS)
@pytest.mark.parametrize("combo", ["bias_add_relu", "all"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward(target, combo, conv, layout):
    """Gradients of every input, the prologue's scale and shift included, in float32."""
    device = use(target)
    leaves = inputs(conv, torch.float32, device, layout, combo, requires_grad=True)
    result = run(conv, *leaves, combo)
    out = result[0] if COMBOS[combo][4] else result
    grad = make(tuple(out.shape), torch.float32, device, layout)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    ref = reference(*ref_leaves, conv, COMBOS[combo][3])
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], grad.double())
    for g, ref_g in zip(grads, ref_grads):
        assert_close(g, ref_g, torch.float32, CONV_TOLERANCE)


@pytest.mark.parametrize("target", TRITON_TARGETS)
def test_single_image_and_folded_entry_points(target):
    """N = 1, and conv_bias_relu / conv_bias_add_relu running the Triton conv."""
    device = use(target)
    conv = CONVS[1]
    x, w, b, z, _, _ = inputs(conv, torch.float32, device, "channels_last", "bias_add_relu", batch=1)
    assert_close(FF.conv_bias_relu(x, w, b, 1, 1), reference(x, w, b, None, None, None, conv, True),
                 torch.float32, CONV_TOLERANCE)
    assert_close(FF.conv_bias_add_relu(x, w, b, z, 1, 1), reference(x, w, b, z, None, None, conv, True),
                 torch.float32, CONV_TOLERANCE)


@pytest.mark.parametrize("target", TRITON_TARGETS)
def test_empty_batch(target):
    device = use(target)
    x = make((0, 4, 5, 5), torch.float32, device)
    out, mean, var = FF.fused_conv2d(x, make((8, 4, 3, 3), torch.float32, device), None, 1, 1,
                                     return_stats=True)
    assert out.shape == (0, 8, 5, 5) and mean.shape == (8,)


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_conv2d_matches_on_every_backend(backend, layout):
    """Every backend computes the same output and statistics: the per-channel mean and
    biased variance of the output, here of 3 x 5 x 5 = 75 output pixels (the Triton tile is
    32 pixels: a partial last tile)."""
    conv = CONVS[2]
    x, w, b, z, scale, shift = inputs(conv, torch.float32, "cpu", layout, "all", batch=3)
    ref = reference(x, w, b, z, scale, shift, conv, True)
    use((backend, "cpu"))
    out, mean, var = run(conv, x, w, b, z, scale, shift, "all")
    assert_close(out, ref, torch.float32, CONV_TOLERANCE)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    assert_close(mean, ref_mean, torch.float32, CONV_TOLERANCE)
    assert_close(var, ref_var, torch.float32, CONV_TOLERANCE)


@pytest.mark.triton
def test_interpreter_refuses_bfloat16_conv():
    if HAS_CUDA:
        pytest.skip("the interpreter runs only without a GPU here")
    use(("triton", "cpu"))
    x, w = make((2, 4, 5, 5), torch.bfloat16), make((8, 4, 3, 3), torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter computes bfloat16 matrix products wrongly"):
        FF.conv_bias_relu(x, w)


def test_fused_conv2d_bad_arguments():
    use(("cpp", "cpu"))
    x, w = make((2, 4, 5, 5)), make((8, 4, 3, 3))
    with pytest.raises(ValueError, match="input_scale and input_shift must be given together"):
        FF.fused_conv2d(x, w, input_scale=torch.ones(4))
    with pytest.raises(ValueError, match="input_scale should contain 4 elements"):
        FF.fused_conv2d(x, w, input_scale=torch.ones(8), input_shift=torch.zeros(8))
    with pytest.raises(ValueError, match="residual must have the convolution's output shape"):
        FF.fused_conv2d(x, w, residual=make((2, 8, 5, 5)))
