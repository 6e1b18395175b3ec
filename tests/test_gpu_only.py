"""What only a GPU can check (all `cuda`-marked: skipped without one, run the day one is lent):
cuDNN's fused convolution and its fallback across dtypes, TF32 settings and shapes; the ops on a
non-default stream and inside a CUDA graph; a second GPU; the installation check."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedres.functional as FF
from conftest import assert_close, make, use

pytestmark = pytest.mark.cuda

# (input shape, C_out, kernel, stride, padding, dilation, groups, layout)
CONVS = {
    "1x1-nchw-tiny": ((1, 1, 8, 8), 4, 1, 1, 0, 1, 1, "nchw"),
    "stem": ((2, 3, 224, 224), 64, 7, 2, 3, 1, 1, "channels_last"),
    "grouped": ((2, 128, 14, 14), 128, 3, 1, 1, 1, 32, "channels_last"),
    "dilated": ((2, 16, 14, 14), 16, 3, 1, 2, 2, 1, "nchw"),
}
CONV_DTYPES = {"float64": (torch.float64, None), "float32-tf32-off": (torch.float32, False),
               "float32-tf32-on": (torch.float32, True), "float16": (torch.float16, None),
               "bfloat16": (torch.bfloat16, None)}
# TF32 keeps a 10-bit mantissa: the tolerance of bfloat16-like arithmetic.
TOLERANCE = {"float64": 1e-10, "float32-tf32-off": 1e-4, "float32-tf32-on": 2e-3,
             "float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype_name", CONV_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_folded_conv_on_the_gpu(conv, dtype_name, residual):
    """cuDNN's fused engine where it has one, the fallback where it has none: the same result
    either way, never an "unable to find an engine" error."""
    use(("cuda", "cuda"))
    shape, c_out, k, stride, padding, dilation, groups, layout = CONVS[conv]
    dtype, tf32 = CONV_DTYPES[dtype_name]
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    try:
        x = make(shape, dtype, "cuda", layout)
        w = make((c_out, shape[1] // groups, k, k), dtype, "cuda", scale=0.1)
        b = torch.randn(c_out, device="cuda")
        ref = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation, groups)
        z = make(tuple(ref.shape), dtype, "cuda", layout) if residual else None
        if residual:
            out = FF.conv_bias_add_relu(x, w, b, z, stride, padding, dilation, groups)
            ref = ref + z.double()
        else:
            out = FF.conv_bias_relu(x, w, b, stride, padding, dilation, groups)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert out.dtype == dtype
    assert_close(out, torch.relu(ref), dtype, {dtype: TOLERANCE[dtype_name]})


def test_fused_conv_output_has_no_stale_nan():
    """cuDNN's fused conv + ReLU receives the fresh output as its z with alpha 0: a NaN left
    in the reused memory must not reach the result."""
    use(("cuda", "cuda"))
    poison = torch.full((2, 64, 56, 56), float("nan"), device="cuda", dtype=torch.float16)
    del poison  # its block goes back to the caching allocator, NaN bytes and all
    x = make((2, 64, 56, 56), torch.float16, "cuda", "channels_last")
    w = make((64, 64, 3, 3), torch.float16, "cuda", scale=0.05)
    out = FF.conv_bias_relu(x, w, torch.zeros(64, device="cuda"), 1, 1)
    assert not torch.isnan(out).any()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_conv_output_over_2_31_elements(layout, residual):
    """The folded conv with an output of more than 2**31 elements (bfloat16, 4.3 GB a tensor):
    cuDNN's fused engine (or the fallback) and the residual + ReLU epilogue index past int32.
    Compared slice by slice against float32 F.conv2d (a wrapped index shows as a wrong
    slice)."""
    use(("cuda", "cuda"))
    n, c, hw = 2**31 // (64 * 128 * 128) + 1, 64, 128
    numel = n * c * hw * hw
    assert numel > 2**31
    need = (3 if residual else 2) * numel * 2 + 4 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=fmt)
    w = make((c, c, 1, 1), torch.bfloat16, "cuda", scale=0.1)
    b = torch.linspace(-1, 1, c, device="cuda")
    z = torch.randn_like(x) if residual else None
    try:
        out = FF.conv_bias_add_relu(x, w, b, z) if residual else FF.conv_bias_relu(x, w, b)
        assert out.numel() == numel
        for i in range(0, n, 8):
            ref = F.conv2d(x[i:i + 8].float(), w.float(), b)
            if residual:
                ref = ref + z[i:i + 8].float()
            assert_close(out[i:i + 8], torch.relu(ref), torch.bfloat16)
    finally:
        del x, z
        torch.cuda.empty_cache()


@pytest.mark.parametrize("training", [True, False])
def test_ops_on_a_side_stream_and_in_a_cuda_graph(training):
    """Forward and backward on a non-default stream, then captured in a CUDA graph after a
    warm-up and replayed on new data: the same results as eager on the default stream."""
    use(("cuda", "cuda"))
    C = 64
    x = make((8, C, 14, 14), torch.float32, "cuda", "channels_last", requires_grad=True)
    z = make((8, C, 14, 14), torch.float32, "cuda", "channels_last")
    w = torch.rand(C, device="cuda", requires_grad=True)

    def step(x, z):
        out = FF.batch_norm_add_relu(x, z, None, None, w, None, training=True) if training \
            else FF.batch_norm_add_relu(x, z, torch.zeros(C, device="cuda"),
                                        torch.ones(C, device="cuda"), w, None, training=False)
        grads = torch.autograd.grad(out.sum(), [x, w])
        # Detached: an output kept with its graph would keep w's gradient node, and with it
        # the stream of that first call, alive into the capture, which autograd then makes
        # wait on a capturing stream (PyTorch refuses that, fused ops or not).
        return out.detach(), grads

    expected = step(x, z)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = step(x, z)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip([got[0], *got[1]], [expected[0], *expected[1]]):
        assert_close(a, b, torch.float32)

    static_x = x.detach().clone().requires_grad_()
    static_z = z.clone()
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph
            step(static_x, static_z)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step(static_x, static_z)
    new_x = make((8, C, 14, 14), torch.float32, "cuda", "channels_last")
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    reference = step(new_x.clone().requires_grad_(), static_z)
    for a, b in zip([static_out, *static_grads], [reference[0], *reference[1]]):
        assert_close(a, b, torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_input_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guard)."""
    use(("cuda", "cuda"))
    x = make((4, 8, 6, 6), torch.float32, "cuda:1", requires_grad=True)
    out = FF.batch_norm_relu(x, None, None, training=True)
    out.sum().backward()
    ref = torch.relu(F.batch_norm(x.detach().double(), None, None, training=True))
    assert out.device == x.device == x.grad.device
    assert_close(out, ref, torch.float32)


def test_installation_check_passes_on_the_gpu():
    done = subprocess.run([sys.executable, "-m", "fusedres", "--ops-only"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
