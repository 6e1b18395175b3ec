"""Shared test helpers: backends and devices, layouts, tolerances and the fp64 reference
comparisons."""
import copy
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# The float32 tolerances below are for float32 arithmetic: PyTorch's default TF32 cuDNN
# convolutions (10-bit mantissa) would miss them on Ampere and later, for fusedres and
# torchvision alike. TF32 stays the user's choice outside the tests.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
if not HAS_CUDA:
    # The Triton kernels run on CPU tensors in the interpreter; it must be on before they load.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the Triton kernels run their fixed tile configs (one compile per specialisation, no
# benchmarking); tests/test_triton_launch.py covers every config and the tuning itself.
os.environ.setdefault("FUSEDRES_TRITON_AUTOTUNE", "0")

import fusedres  # noqa: E402

HAS_TRITON = fusedres.info()["available"]["triton"]

# Relative norm error allowed against the fp64 reference (ARCHITECTURE.md, "Numerics for tests").
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
CONV_TOLERANCE = {**TOLERANCE, torch.float32: 1e-4}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# (backend, device) pairs every fused op is checked on.
NATIVE_TARGETS = [
    pytest.param(("cpp", "cpu"), id="cpp"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
]
# The CUDA kernels' own sources, compiled as host C++ and run on CPU tensors (csrc/emulation):
# every CI run executes them, though no GPU is there.
EMULATED = pytest.param(("cuda-emulated", "cpu"), id="cuda-emulated", marks=pytest.mark.emulated)
TARGETS = NATIVE_TARGETS + [EMULATED] + [
    pytest.param(("triton", "cpu"), id="triton-interpreter", marks=pytest.mark.triton),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.triton]),
]
# The reference backend as well, where its own code (not F.batch_norm) is involved: the
# running statistics of momentum=None and the dual form. It is what `auto` falls back to.
TARGETS_AND_REFERENCE = TARGETS + [pytest.param(("reference", "cpu"), id="reference")]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="Triton kernels unavailable: " + str(
        fusedres.info()["unavailable_reasons"].get("triton")))
    emulation_missing = fusedres._backend.unavailable_reason("cuda-emulated", "cpu")
    skip_emulated = pytest.mark.skip(reason=f"CUDA emulation unavailable: {emulation_missing}")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)
        if "emulated" in item.keywords and emulation_missing:
            item.add_marker(skip_emulated)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = fusedres.get_backend()
    yield
    fusedres.set_backend(previous)
    if "fusedres._C_emulated" in sys.modules:
        sys.modules["fusedres._C_emulated"].guard_allocations(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def use(target):
    """Makes target's backend active; returns its device. For the emulated CUDA kernels, the
    test's CPU tensors are allocated right before an inaccessible page from here on, so a kernel
    that reads or writes past a tensor's end fails with an error naming it."""
    backend, device = target
    fusedres.set_backend(backend)
    if backend == "cuda-emulated":
        fusedres._backend.resolve(torch.device(device))  # loads the emulation build
        sys.modules["fusedres._C_emulated"].guard_allocations(True)
    return device


def make(shape, dtype=torch.float32, device="cpu", layout="nchw", scale=1.0, offset=0.0,
         requires_grad=False):
    """Fresh random input in a given memory layout (never zeros, which hide unwritten output)."""
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    elif layout == "strided":  # neither contiguous nor channels_last
        t = torch.cat([t, t], dim=-1)[..., ::2]
    t = t.to(device)
    return t.requires_grad_(requires_grad)


def rel_err(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm()
    if denom == 0:
        return out.norm().item()
    return ((out - ref).norm() / denom).item()


def nudged(model, seed=0):
    """A copy of a float64 model with every parameter moved by about one unit in the last place
    (a relative N(0, 2**-52) step). It computes the same function as `model` up to float64's
    rounding, so how far its results land from the model's is the noise of the comparison
    itself, which deep networks, a few values per BN channel and SGD steps amplify far past
    1e-16 (ResNet-50's eval output after one training step moves by 2e-10). Nudge before
    making the optimizers."""
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            step = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.mul_(1 + 2.0**-52 * step.to(p.device))
    return twin


NOISE_FACTOR = 10


def each_close64(ours, theirs, tolerance=1e-10, noise=None):
    """Each named floating-point tensor of `ours` (float64 unless a test passes its own
    `tolerance`) within `tolerance` (relative norm) of the one of `theirs` with the same name;
    integer tensors equal. `noise`, the same tensors from a
    nudged() twin of the reference, widens the bound to NOISE_FACTOR times its worst error
    against the reference where the comparison is that ill-conditioned: no float64
    implementation can be held closer than the reference is to itself (a wrong term is off by
    far more)."""
    ours, theirs = list(ours), list(theirs)
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    bound = tolerance
    if noise is not None:
        noise = list(noise)
        assert [n for n, _ in noise] == [n for n, _ in theirs]
        bound = max(tolerance, NOISE_FACTOR * max(
            rel_err(t, ref) for (_, t), (_, ref) in zip(noise, theirs) if t.is_floating_point()))
    for (name, t), (_, ref) in zip(ours, theirs):
        assert t.shape == ref.shape, (name, t.shape, ref.shape)  # rel_err would broadcast
        if t.is_floating_point():
            err = rel_err(t, ref)
            assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"
        else:
            assert torch.equal(t.cpu(), ref.cpu()), name


def assert_as_accurate(out, ref32, ref64, floor=1e-4, factor=3):
    """out is as close to the float64 truth ref64 as PyTorch's own float32 result ref32:
    within `factor` times its error, and `floor` in any case (a wrong formula is off by far
    more). Where ref32 itself overflows, `floor` alone."""
    own = rel_err(ref32, ref64) if torch.isfinite(ref32).all() else 0.0
    err = rel_err(out, ref64)
    bound = max(floor, factor * own)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g} (PyTorch float32: {own:.3g})"


def assert_state_as_accurate(model, reference, reference64, floor=1e-4):
    """Every floating-point entry of model's state_dict as accurate as reference's (float32)
    against reference64's; the others (num_batches_tracked) equal."""
    state, state32, state64 = (m.state_dict() for m in (model, reference, reference64))
    for key, value in state.items():
        if value.is_floating_point():
            assert_as_accurate(value, state32[key], state64[key], floor)
        else:
            assert torch.equal(value.cpu(), state32[key].cpu()), key


def assert_close(out, ref, dtype, tolerance=TOLERANCE):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err <= tolerance[dtype], f"relative error {err:.3g} > {tolerance[dtype]:.0e} ({dtype})"



def randomize_bn(model):
    """model with non-trivial BN affine and statistics (uniform draws from torch's RNG: seed
    before calling); returns it."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model

def has_layout(t, layout):
    """True if t is dense in `layout` ("nchw" or "channels_last"; both hold when C or H*W is 1)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.is_contiguous(memory_format=fmt)
