"""Triton: out = act((input - mean[c]) * scale[c] + shift[c] + residual term), one pass.

The residual term is absent, the residual itself, or (residual - residual_mean[c]) *
residual_scale[c] + residual_shift[c] (the dual-BN form); see csrc/fusedres.cpp. Each program
normalises one (BLOCK_R, BLOCK_C) tile, its channels' coefficients loaded once (tile tuned
on the GPU).
Also the kernel of add_relu (no per-channel terms at all), and batch_norm_coefficients: an
eval BN's (mean, scale, shift) for it in one small launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres._ops import CHANNEL_DTYPES, accumulate_dtype, check, dense, match_layout

from ._common import (TILE_CONFIGS, TILE_FIXED, TILE_INTERPRETED, TILE_KEY, autotuned,
                      channel_view, float_pair, inverse_std, launch, tile_grid, tile_of_program,
                      tile_offsets, tl_acc)


@triton.jit
def _channel_values(ptr, cols, col_ok, PRESENT: tl.constexpr, NEUTRAL: tl.constexpr,
                    ACC: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + cols, mask=col_ok, other=NEUTRAL).to(ACC)
    return tl.full(cols.shape, NEUTRAL, ACC)


@triton.jit
def affine_value(x, m, s, b):
    """(x - m) * s + b: one expression for the normalize pass and the backward's ReLU mask
    recomputation, so that both round it alike (one fused multiply-add on a GPU)."""
    return (x - m) * s + b


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED)
@triton.jit
def _normalize_kernel(x_ptr, r_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, r_mean_ptr,
                      r_scale_ptr, r_shift_ptr, rows, C, INNER: tl.constexpr,
                      HAS_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, HAS_R_MEAN: tl.constexpr,
                      HAS_R_SCALE: tl.constexpr, HAS_R_SHIFT: tl.constexpr, RELU: tl.constexpr,
                      ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, cols = tile_of_program(rows, C, BLOCK_R, BLOCK_C)
    col_ok = cols < C
    ok = (r < rows)[:, None] & col_ok[None, :]
    offsets = tile_offsets(r, cols, C, INNER)
    m = _channel_values(mean_ptr, cols, col_ok, HAS_MEAN, 0.0, ACC)
    s = _channel_values(scale_ptr, cols, col_ok, HAS_SCALE, 1.0, ACC)
    b = _channel_values(shift_ptr, cols, col_ok, HAS_SHIFT, 0.0, ACC)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(ACC)
    y = affine_value(x, m[None, :], s[None, :], b[None, :])
    if HAS_RESIDUAL:
        rm = _channel_values(r_mean_ptr, cols, col_ok, HAS_R_MEAN, 0.0, ACC)
        rs = _channel_values(r_scale_ptr, cols, col_ok, HAS_R_SCALE, 1.0, ACC)
        rb = _channel_values(r_shift_ptr, cols, col_ok, HAS_R_SHIFT, 0.0, ACC)
        z = tl.load(r_ptr + offsets, mask=ok, other=0.0).to(ACC)
        y += (z - rm[None, :]) * rs[None, :] + rb[None, :]
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)


def normalize_act(input, mean=None, scale=None, shift=None, residual=None, residual_mean=None,
                  residual_scale=None, residual_shift=None, relu=False):
    """Launches the kernel on a fresh output in input's layout (absent terms are neutral)."""
    x = dense(input)
    residual = match_layout(residual, x)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    rows, C, inner = channel_view(x)
    vectors = [t.contiguous() if t is not None else None
               for t in (mean, scale, shift, residual_mean, residual_scale, residual_shift)]
    dummy = x  # stands in for absent pointers; never read
    launch(
        _normalize_kernel, tile_grid(rows, C), x.device,
        x, residual if residual is not None else dummy, out,
        *[v if v is not None else dummy for v in vectors], rows, C, inner,
        HAS_MEAN=mean is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RESIDUAL=residual is not None, HAS_R_MEAN=residual_mean is not None,
        HAS_R_SCALE=residual_scale is not None, HAS_R_SHIFT=residual_shift is not None,
        RELU=relu, ACC=tl_acc(x.dtype))
    return out


@torch.library.custom_op("fusedres_triton::batch_norm_apply", mutates_args=())
def batch_norm_apply(input: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     shift: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                     residual_mean: Optional[torch.Tensor], residual_scale: Optional[torch.Tensor],
                     residual_shift: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    check("batch_norm_apply", input, mean, scale, shift, residual, residual_mean, residual_scale,
          residual_shift, relu)
    return normalize_act(input, mean, scale, shift, residual, residual_mean, residual_scale,
                         residual_shift, relu)


@triton.jit
def _coefficients_kernel(running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, mean_ptr,
                         scale_ptr, shift_ptr, C, eps_hi, eps_lo, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """batch_norm_coefficients, BLOCK channels a program: mean = running_mean, scale = weight /
    sqrt(running_var + eps), shift = bias (0 without one)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    tl.store(mean_ptr + cols, tl.load(running_mean_ptr + cols, mask=ok, other=0.0).to(ACC),
             mask=ok)
    var = tl.load(running_var_ptr + cols, mask=ok, other=1.0).to(ACC)
    scale = inverse_std(var, eps_hi, eps_lo, ACC)
    scale *= _channel_values(weight_ptr, cols, ok, HAS_WEIGHT, 1.0, ACC)
    tl.store(scale_ptr + cols, scale, mask=ok)
    tl.store(shift_ptr + cols, _channel_values(bias_ptr, cols, ok, HAS_BIAS, 0.0, ACC), mask=ok)


_COEFFICIENTS_BLOCK = 256


@torch.library.custom_op("fusedres_triton::batch_norm_coefficients", mutates_args=())
def batch_norm_coefficients(input: torch.Tensor, running_mean: torch.Tensor,
                            running_var: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check("batch_norm_coefficients", input, running_mean, running_var, weight, bias, eps)
    acc = accumulate_dtype(input.dtype)
    C = input.shape[1]
    mean, scale, shift = (torch.empty(C, dtype=acc, device=input.device) for _ in range(3))
    if C == 0:
        return mean, scale, shift
    # (read in their own dtype where the kernel can, as the CUDA kernels' ChannelParam)
    vectors = [t if t is None or t.dtype in CHANNEL_DTYPES else t.to(acc)
               for t in (running_mean, running_var, weight, bias)]
    vectors = [t.contiguous() if t is not None else mean for t in vectors]  # (mean: never read)
    launch(_coefficients_kernel, (triton.cdiv(C, _COEFFICIENTS_BLOCK),), input.device, *vectors,
           mean, scale, shift, C, *float_pair(eps), HAS_WEIGHT=weight is not None,
           HAS_BIAS=bias is not None, ACC=tl_acc(input.dtype), BLOCK=_COEFFICIENTS_BLOCK)
    return mean, scale, shift
