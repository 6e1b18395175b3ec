"""Shared test helpers: devices, layouts, tolerances and the fp64 reference comparisons."""
import pytest
import torch

import fusedres

HAS_CUDA = torch.cuda.is_available()

# Relative norm error allowed against the fp64 reference (DESIGN.md, "Numerics for tests").
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
CONV_TOLERANCE = {**TOLERANCE, torch.float32: 1e-4}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = fusedres.get_backend()
    yield
    fusedres.set_backend(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def native_backend(device):
    """The compiled backend of a device: what these tests check against the reference."""
    return {"cpu": "cpp", "cuda": "cuda"}[device]


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


def assert_close(out, ref, dtype, tolerance=TOLERANCE):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err <= tolerance[dtype], f"relative error {err:.3g} > {tolerance[dtype]:.0e} ({dtype})"


def has_layout(t, layout):
    """True if t is dense in `layout` ("nchw" or "channels_last"; both hold when C or H*W is 1)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.is_contiguous(memory_format=fmt)
