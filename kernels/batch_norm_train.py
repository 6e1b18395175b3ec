"""Triton: the training-mode fused BN forwards, as csrc/batch_norm_train.h: batch
statistics (batch_norm_stats.py), then one normalize (+ residual) (+ ReLU) pass
(batch_norm_apply.py). Autograd: fusedres/_ops.py."""
from __future__ import annotations

from typing import Optional

import torch

from fusedres._ops import check

from .batch_norm_apply import normalize_act
from .batch_norm_stats import channel_stats


@torch.library.custom_op("fusedres_triton::batch_norm_act_train", mutates_args=())
def batch_norm_act_train(input: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                         eps: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    check("batch_norm_act_train", input, weight, bias, residual, eps, relu)
    mean, var, invstd, scale, shift = channel_stats(input, (weight, bias, eps))
    out = normalize_act(input, mean, scale, shift, residual, relu=relu)
    return out, mean, var, invstd, scale, shift


@torch.library.custom_op("fusedres_triton::add_batch_norm_act_train", mutates_args=())
def add_batch_norm_act_train(input: torch.Tensor, residual: torch.Tensor,
                             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             eps: float, relu: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    check("add_batch_norm_act_train", input, residual, weight, bias, eps, relu)
    total, mean, var, invstd, scale, shift = channel_stats(input, (weight, bias, eps), residual)
    out = normalize_act(total, mean, scale, shift, relu=relu)
    return out, total, mean, var, invstd, scale, shift


@torch.library.custom_op("fusedres_triton::dual_batch_norm_act_train", mutates_args=())
def dual_batch_norm_act_train(
    input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    residual: torch.Tensor, residual_weight: Optional[torch.Tensor],
    residual_bias: Optional[torch.Tensor], eps: float, residual_eps: float, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    check("dual_batch_norm_act_train", input, weight, bias, residual, residual_weight,
          residual_bias, eps, residual_eps, relu)
    mean, var, invstd, scale, shift = channel_stats(input, (weight, bias, eps))
    residual_mean, residual_var, residual_invstd, residual_scale, residual_shift = channel_stats(
        residual, (residual_weight, residual_bias, residual_eps))
    out = normalize_act(input, mean, scale, shift, residual, residual_mean, residual_scale,
                        residual_shift, relu)
    return out, mean, var, invstd, residual_mean, residual_var, residual_invstd
