"""Triton: out = relu(input + residual) in one pass (the normalize kernel with no
per-channel terms)."""
from __future__ import annotations

import torch

from fusedres._ops import check

from .batch_norm_apply import normalize_act


@torch.library.custom_op("fusedres_triton::add_relu", mutates_args=())
def add_relu(input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    check("add_relu", input, residual)
    return normalize_act(input, residual=residual, relu=True)
