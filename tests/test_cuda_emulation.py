"""The emulation build of the CUDA kernels (csrc/emulation): the sources of csrc/cuda compiled
as host C++ run on CPU tensors as the `cuda-emulated` backend, which every op test targets
(conftest.TARGETS). Here: that every kernel is launched, that the emulated device gives real
grids, that an out-of-bounds access is caught, misaligned views, and the fallback of the
folded convolution."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF
from conftest import TARGETS, assert_close, make, use

CUDA_SOURCES = Path(__file__).parent.parent / "csrc" / "cuda"



def kernels_in_sources():
    names = set()
    for path in list(CUDA_SOURCES.glob("*.cu")) + list(CUDA_SOURCES.glob("*.cuh")):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)",
                                path.read_text()))
    return names


def every_op_once():
    """Each op on both layouts, on vectorisable (C = 8) and scalar (C = 3) shapes."""
    for layout in ("nchw", "channels_last"):
        for C in (8, 3):
            x = make((2, C, 4, 6), torch.float32, "cpu", layout, requires_grad=True)
            z = make((2, C, 4, 6), torch.float32, "cpu", layout, requires_grad=True)
            rm, rv = torch.zeros(C), torch.ones(C)
            w = torch.ones(C, requires_grad=True)
            out = FF.dual_batch_norm_add_relu(x, z, rm, rv, rm.clone(), rv.clone(), w, None,
                                              None, None, training=True)
            out = FF.batch_norm_add_relu(out, z, rm, rv, w, None, training=False)
            FF.add_relu(out, z).sum().backward()
            FF.conv_bias_relu(x.detach(), torch.randn(4, C, 3, 3), torch.randn(4), padding=1)


@pytest.mark.emulated
def test_every_kernel_is_launched():
    """Every __global__ function of csrc/cuda runs in the emulation: a new kernel that no op
    reaches fails here."""
    import fusedres._C_emulated as emulated

    use(("cuda-emulated", "cpu"))
    every_op_once()
    missing = kernels_in_sources() - set(emulated.launched_kernels())
    assert not missing, f"kernels never launched in the emulation: {sorted(missing)}"


@pytest.mark.emulated
def test_emulated_sources_are_the_cuda_sources():
    """The emulation compiles csrc/cuda itself (one include per .cu file), not a copy."""
    emulation = Path(__file__).parent.parent / "csrc" / "emulation"
    for cu in CUDA_SOURCES.glob("*.cu"):
        wrapper = emulation / (cu.stem + ".cpp")
        assert f'#include "../cuda/{cu.name}"' in wrapper.read_text(), wrapper


@pytest.mark.emulated
def test_out_of_bounds_access_is_caught():
    """A deliberately broken test-only kernel reads one element past its input's end: the
    launch fails with the kernel, block and thread, instead of reading a neighbour's memory."""
    use(("cuda-emulated", "cpu"))
    x = torch.randn(100)
    with pytest.raises(RuntimeError, match=r"out-of-bounds access .* in kernel "
                                           r"read_past_end_kernel, block \(1, 0, 0\), "
                                           r"thread \(35, 0, 0\)"):
        torch.ops.fusedres_emulated.read_past_end(x)
    x = torch.randn(101)[:100]  # an in-bounds read of the 101st element: no error
    assert torch.equal(torch.ops.fusedres_emulated.read_past_end(x)[:-1], x[1:])


@pytest.mark.emulated
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_blocks_and_rows_per_thread(layout):
    """On the emulated device (2 SMs) a reduction over 2048 channels and 4 x 13 x 11 values
    uses several blocks, several partials per channel and several rows per thread; C = 2048
    in bfloat16 as well."""
    use(("cuda-emulated", "cpu"))
    for dtype, C in ((torch.float32, 512), (torch.bfloat16, 2048)):
        x = make((4, C, 13, 11), dtype, "cpu", layout, scale=3.0, offset=2.0)
        mean, var = torch.ops.fusedres_emulated.batch_norm_stats(x)
        ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        assert_close(mean, ref_mean, torch.float32)
        assert_close(var, ref_var, torch.float32)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_folded_conv_falls_back_without_a_fused_engine(dtype, residual):
    """cuDNN's fused conv has no engine in the emulation (nor, on a GPU, for float64 and some
    shapes): the convolution with its bias then runs, followed by the library's own residual +
    ReLU kernel, with the same result."""
    use(("cuda-emulated", "cpu"))
    x = make((2, 4, 7, 7), dtype, "cpu", "channels_last")
    w = make((6, 4, 3, 3), dtype, "cpu", scale=0.3)
    b = torch.randn(6)
    z = make((2, 6, 7, 7), dtype, "cpu", "channels_last") if residual else None
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    if residual:
        ref = ref + z.double()
        out = FF.conv_bias_add_relu(x, w, b, z, padding=1)
    else:
        out = FF.conv_bias_relu(x, w, b, padding=1)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3}
    assert_close(out, torch.relu(ref), dtype, tolerance)


@pytest.mark.emulated
def test_backend_is_listed_and_refuses_other_devices():
    assert "cuda-emulated" in fusedres.info()["available"]
    why = fusedres._backend.unavailable_reason("cuda-emulated", "cuda")
    assert why is not None and "CPU tensors" in why


@pytest.mark.emulated
@pytest.mark.parametrize("library", ["fusedres", "fusedres_emulated"])
def test_backward_input_checks_its_weight(library):
    """The raw backward op refuses a weight that is not a floating per-channel vector before
    any kernel reads it (on a GPU, a CPU weight would be a host pointer: test below)."""
    use(("cuda-emulated", "cpu"))  # loads the emulated library
    op = getattr(torch.ops, library).batch_norm_backward_input
    x, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    stats = [torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3)]
    with pytest.raises(RuntimeError, match="weight must be a floating point tensor"):
        op(g, None, x, stats[0], stats[1], torch.ones(3, dtype=torch.int64), stats[2], stats[3])
    with pytest.raises(RuntimeError, match=r"weight must have shape \(3,\)"):
        op(g, None, x, stats[0], stats[1], torch.ones(4), stats[2], stats[3])


@pytest.mark.cuda
def test_backward_input_refuses_a_cpu_weight_on_the_gpu():
    op = torch.ops.fusedres.batch_norm_backward_input
    x, g = torch.randn(2, 3, 4, 4, device="cuda"), torch.randn(2, 3, 4, 4, device="cuda")
    stats = [torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")] * 2
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        op(g, None, x, stats[0], stats[1], torch.ones(3), stats[2], stats[3])


def misaligned(t):
    """t's values in a view that starts 4 bytes into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    if t.is_contiguous():
        return flat.view(t.shape).copy_(t)
    perm = flat.view(t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2)
    return perm.copy_(t)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("which", ["input", "residual", "grad_out"])
def test_misaligned_views(target, layout, which):
    """A tensor that is a view 4 bytes into its storage (x alone, the residual alone, grad_out
    alone) takes the kernels' unvectorised path, with the same result."""
    device = use(target)
    if device != "cpu":
        pytest.skip("views of CPU storage")
    shape = (2, 8, 4, 6)  # C and H * W multiples of every vector width
    x = make(shape, torch.float32, "cpu", layout, scale=2.0, offset=1.0)
    z = make(shape, torch.float32, "cpu", layout)
    g = make(shape, torch.float32, "cpu", layout)
    x, z, g = [misaligned(t) if name == which else t
               for name, t in (("input", x), ("residual", z), ("grad_out", g))]
    x.requires_grad_()
    w = torch.rand(8, requires_grad=True)
    out = FF.batch_norm_add_relu(x, z, None, None, w, None, training=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.relu(F.batch_norm(x64, None, None, w64, None, True) + z.double())
    assert_close(out, ref, torch.float32)
    for got, expected in zip(torch.autograd.grad(out, [x, w], g),
                             torch.autograd.grad(ref, [x64, w64], g.double())):
        assert_close(got, expected, torch.float32, {torch.float32: 1e-4})


@pytest.mark.parametrize("target", TARGETS)
def test_expanded_inputs(target):
    """Inputs with stride-0 dimensions (expand views: one image broadcast over the batch, one
    row over the height) are read as the dense tensors they stand for."""
    device = use(target)
    x = make((1, 8, 4, 6), torch.float32, device, scale=2.0).expand(3, 8, 4, 6)
    z = make((3, 8, 1, 6), torch.float32, device).expand(3, 8, 4, 6)
    out = FF.batch_norm_add_relu(x, z, None, None, None, None, training=True)
    ref = torch.relu(F.batch_norm(x.double(), None, None, training=True) + z.double())
    assert_close(out, ref, torch.float32)
