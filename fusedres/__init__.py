"""fusedres: fused BatchNorm / ReLU / residual kernels for ResNets in PyTorch.

    import fusedres
    fusedres.info()                              # what was built, loaded, and is active
    fusedres.functional.batch_norm_relu(...)     # the fused ops
    with fusedres.backend("reference"): ...      # pick an implementation
"""
from . import _extension  # noqa: F401  (loads the compiled ops; warns if it cannot)
from . import functional
from ._backend import BACKENDS, backend, get_backend, info, set_backend

__version__ = "0.1.0"

__all__ = ["functional", "BACKENDS", "backend", "get_backend", "info", "set_backend"]
