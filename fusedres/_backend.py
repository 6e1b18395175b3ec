"""Which implementation the fused ops run: one process-wide choice, read at every call.

``auto`` picks the fastest implementation available for the tensor's device; the others
name one implementation and raise a clear error where it cannot run.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _extension

# cuda-emulated: the CUDA kernels compiled as host C++, on CPU tensors (slow; for tests).
BACKENDS = ("auto", "reference", "cpp", "cuda", "triton", "cuda-emulated")
ENV_VAR = "FUSEDRES_BACKEND"


def _initial() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        warnings.warn(
            f"fusedres: {ENV_VAR}={name!r} is not a backend (choose from {', '.join(BACKENDS)}); "
            f"using 'auto'",
            RuntimeWarning,
            stacklevel=2,
        )
        return "auto"
    return name


# A plain module global (not a ContextVar) so that torch.compile can guard on it.
_active = _initial()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"fusedres: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: str) -> None:
    """Sets the backend of all fused ops: auto, reference, cpp, cuda, triton, or cuda-emulated
    (the CUDA kernels on CPU tensors, for tests)."""
    global _active
    _active = _check_name(name)


def get_backend() -> str:
    """The backend set by set_backend / backend() / FUSEDRES_BACKEND (may be 'auto')."""
    return _active


@contextlib.contextmanager
def backend(name: str):
    """Runs the block with another backend, restoring the previous one afterwards."""
    global _active
    previous = _active
    _active = _check_name(name)
    try:
        yield
    finally:
        _active = previous


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if backend `name` can run ops on tensors of `device_type`, else why not."""
    if name == "reference":
        return None
    if name == "cpp":
        if not _extension.cpp_loaded:
            return f"the C++ extension did not load ({_extension.cpp_error})"
        if device_type != "cpu":
            return f"it runs on CPU tensors, got a {device_type} tensor"
        return None
    if name == "cuda":
        if not _extension.cuda_loaded:
            return f"the CUDA extension is unavailable ({_extension.cuda_error})"
        if device_type != "cuda":
            return f"it runs on CUDA tensors, got a {device_type} tensor"
        return None
    if name == "triton":
        if not _extension.triton_loaded:
            return f"the Triton kernels did not load ({_extension.triton_error})"
        if device_type == "cuda" or (device_type == "cpu" and _extension.triton_interpreted):
            return None
        return (f"it runs on CUDA tensors (CPU tensors only under the Triton interpreter, "
                f"TRITON_INTERPRET=1), got a {device_type} tensor")
    if name == "cuda-emulated":
        error = _extension.load_emulation()
        if error is not None:
            return f"the CUDA emulation build did not load ({error})"
        if device_type != "cpu":
            return f"it runs on CPU tensors, got a {device_type} tensor"
        return None
    raise ValueError(f"fusedres: unknown backend {name!r}")


def op_library(name: str):
    """The torch.ops namespace of a compiled backend's ops."""
    if name == "triton":
        return torch.ops.fusedres_triton
    if name == "cuda-emulated":
        return torch.ops.fusedres_emulated
    return torch.ops.fusedres


def resolve(device: torch.device) -> str:
    """The concrete backend that runs an op on `device` (never 'auto')."""
    name = _active
    if name == "auto":
        native = {"cpu": "cpp", "cuda": "cuda"}.get(device.type)
        if native is not None and unavailable_reason(native, device.type) is None:
            return native
        return "reference"
    why = unavailable_reason(name, device.type)
    if why is not None:
        raise RuntimeError(f"fusedres: backend {name!r} cannot run this op: {why}")
    return name


def info() -> dict:
    """What was built, what loaded, which backends are available and which is active."""
    bi = _extension.build_info
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    available = {}
    for name in BACKENDS[1:]:
        reasons = [unavailable_reason(name, d) for d in devices]
        available[name] = any(r is None for r in reasons)
    return {
        "torch": torch.__version__,
        "built": {
            "torch": bi.TORCH_VERSION if bi else None,
            "cpp": bi is not None,
            "cuda": bool(bi and bi.CUDA_BUILT),
            "cuda_reason": bi.CUDA_REASON if bi else "not built",
            "cuda_arch_list": bi.CUDA_ARCH_LIST if bi else None,
        },
        "loaded": {"cpp": _extension.cpp_loaded, "cuda": _extension.cuda_loaded,
                   "triton": _extension.triton_loaded},
        "errors": {"cpp": _extension.cpp_error, "cuda": _extension.cuda_error,
                   "triton": _extension.triton_error},
        "triton_interpreter": _extension.triton_interpreted,
        "available": available,
        "unavailable_reasons": {
            name: _why_unavailable_here(name) for name in BACKENDS[1:] if not available[name]
        },
        "active": _active,
        "resolved": {d: resolve_or_none(d) for d in devices},
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _why_unavailable_here(name: str) -> str:
    if name == "cuda" and _extension.cuda_loaded and not torch.cuda.is_available():
        return "no CUDA device is visible (the CUDA kernels are built but cannot run here)"
    if name == "triton" and _extension.triton_loaded and not torch.cuda.is_available():
        return ("no CUDA device is visible; on CPU tensors the Triton kernels run only under "
                "the interpreter, TRITON_INTERPRET=1")
    return unavailable_reason(name, "cuda" if name == "cuda" else "cpu")


def resolve_or_none(device_type: str) -> str | None:
    try:
        return resolve(torch.device(device_type))
    except RuntimeError:
        return None
