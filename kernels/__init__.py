"""Triton kernels of fusedres, installed as ``fusedres.kernels``: the `triton` backend.

One file per op (kernel, launcher and its torch.library op in the `fusedres_triton`
namespace, with the same schema as the C++ op of the same name); fake kernels and autograd
are shared with the C++ ops (fusedres/_ops.py). On CPU tensors the kernels run only under
the Triton interpreter (TRITON_INTERPRET=1, set before import), for tests.
"""
from fusedres._ops import register as _register

from . import (add_relu, batch_norm_apply, batch_norm_backward, batch_norm_stats, batch_norm_train,
               fused_conv2d)
from ._common import INTERPRETED

_register("fusedres_triton")

__all__ = ["INTERPRETED", "add_relu", "batch_norm_apply", "batch_norm_backward",
           "batch_norm_stats", "batch_norm_train", "fused_conv2d"]
