"""Loads the compiled extensions. A missing or broken build never breaks ``import fusedres``:
it warns once, says why and how to rebuild, and the backends that need it become unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

REBUILD_HINT = "rebuild in the fusedres checkout with: pip install -e . --no-build-isolation"

try:
    from . import _build_info as build_info  # written by setup.py
except ImportError:  # running from a checkout that was never built
    build_info = None

cpp_loaded = False
cpp_error: str | None = None
cuda_loaded = False
cuda_error: str | None = None
triton_loaded = False
triton_error: str | None = None
triton_interpreted = False  # TRITON_INTERPRET=1: the Triton kernels also run on CPU tensors


def _import(name: str) -> str | None:
    """Imports a compiled module; returns None on success, else why it failed."""
    try:
        importlib.import_module(name)
        return None
    except (ImportError, OSError, RuntimeError) as e:  # missing file, ABI / symbol mismatch,
        # no triton
        return f"{type(e).__name__}: {e}"


def _load() -> None:
    global cpp_loaded, cpp_error, cuda_loaded, cuda_error
    cpp_error = _import("fusedres._C")
    cpp_loaded = cpp_error is None
    if not cpp_loaded:
        warnings.warn(
            f"fusedres: the compiled extension fusedres._C could not be loaded ({cpp_error}). "
            f"The 'cpp' and 'cuda' backends are unavailable and 'auto' falls back to "
            f"'reference'; {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
        cuda_error = "fusedres._C did not load"
        return
    if importlib.util.find_spec("fusedres._C_cuda") is None:
        reason = build_info.CUDA_REASON if build_info is not None else "not built"
        cuda_error = f"not built ({reason})"
        if torch.cuda.is_available():
            warnings.warn(
                f"fusedres was built without its CUDA kernels ({reason}), so the 'cuda' backend "
                f"is unavailable on this GPU machine; {REBUILD_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    cuda_error = _import("fusedres._C_cuda")
    cuda_loaded = cuda_error is None
    if not cuda_loaded:
        warnings.warn(
            f"fusedres: the CUDA extension fusedres._C_cuda could not be loaded ({cuda_error}). "
            f"The 'cuda' backend is unavailable; {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )


def _load_triton() -> None:
    """The Triton kernels are optional: without triton the backend is just unavailable."""
    global triton_loaded, triton_error, triton_interpreted
    triton_error = _import("fusedres.kernels")
    triton_loaded = triton_error is None
    if triton_loaded:
        triton_interpreted = importlib.import_module("fusedres.kernels").INTERPRETED


_emulation_tried = False
_emulation_error: str | None = None


def load_emulation() -> str | None:
    """Loads the emulation build of the CUDA kernels (fusedres._C_emulated, the cuda-emulated
    backend) on first use; returns None once loaded, else why it cannot load."""
    global _emulation_tried, _emulation_error
    if not _emulation_tried:
        _emulation_tried = True
        if not cpp_loaded:
            _emulation_error = "fusedres._C did not load"
        elif importlib.util.find_spec("fusedres._C_emulated") is None:
            _emulation_error = "not built (FUSEDRES_NO_EMULATION was set)"
        else:
            _emulation_error = _import("fusedres._C_emulated")
            if _emulation_error is None:
                from ._ops import register

                register("fusedres_emulated")
    return _emulation_error


_load()
_load_triton()
