"""Triton: the training BN backward in two passes over (grad_out, output, input):
  reduce: sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) per channel
  input:  grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M)
g = grad_out, zeroed where the saved output is <= 0 (the ReLU mask) when output is given;
xhat = (input - mean) * invstd. The reduce pass writes one partial per program, summed by a
second kernel in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusedres._ops import check, dense, match_layout

from ._common import (TILE_CONFIGS, TILE_FIXED, TILE_INTERPRETED, TILE_KEY, acc_dtype, autotuned,
                      channel_view, launch, row_split, tile_grid, tile_of_program, tile_offsets,
                      tl_acc)
from .batch_norm_stats import MERGE_ROWS


@triton.jit
def _masked_grad(dy_ptr, y_ptr, offsets, ok, MASKED: tl.constexpr, ACC: tl.constexpr):
    g = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(ACC)
    if MASKED:  # passes where !(y <= 0), as threshold_backward
        y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(ACC)
        g = tl.where(y <= 0.0, 0.0, g)
    return g


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED)
@triton.jit
def _reduce_partial_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, part_ptr, rows, C, inner,
                           rows_per_program, MASKED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (channel blocks, row programs), as _stats_partial_kernel
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_r = tl.program_id(1).to(tl.int64)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < end)[:, None] & col_ok[None, :]
        offsets = tile_offsets(r, cols, C, inner, CHANNELS_LAST)
        g = _masked_grad(dy_ptr, y_ptr, offsets, ok, MASKED, ACC)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(ACC)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * tl.where(ok, x - mean[None, :], 0.0), axis=0)
    out = part_ptr + pid_r * C + cols
    tl.store(out, sum_g, mask=col_ok)
    tl.store(out + tl.num_programs(1).to(tl.int64) * C, sum_gx, mask=col_ok)


@triton.jit
def _reduce_merge_kernel(part_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr, programs, C,
                         ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the partial rows, BLOCK_P at a time as a tree (tl.sum): a serial sum over
    hundreds of rows is a chain of dependent loads and adds per channel."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < programs)[:, None] & col_ok[None, :]
        part = part_ptr + p[:, None] * C + cols[None, :]
        sum_g += tl.sum(tl.load(part, mask=ok, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(part + programs * C, mask=ok, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(sum_dy_ptr + cols, sum_g, mask=col_ok)
    tl.store(sum_dy_xhat_ptr + cols, sum_gx * invstd, mask=col_ok)


@triton.jit
def _divide(a, b, ACC: tl.constexpr):
    """a / b rounded as torch rounds it (Triton's float32 `/` is approximate on a GPU)."""
    if ACC == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED)
@triton.jit
def _input_grad_kernel(dy_ptr, y_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr,
                       sum_dy_ptr, sum_dy_xhat_ptr, count, rows, C, inner, MASKED: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = k * (g - mean_dy - (x - mean) * proj), the per-channel k = weight * invstd,
    mean_dy = sum_dy / count, proj = sum_dy_xhat * invstd / count computed here for the
    tile's channels (no per-channel torch ops before the launch)."""
    r, cols = tile_of_program(rows, C, BLOCK_R, BLOCK_C)
    col_ok = cols < C
    ok = (r < rows)[:, None] & col_ok[None, :]
    offsets = tile_offsets(r, cols, C, inner, CHANNELS_LAST)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    k = invstd
    if HAS_WEIGHT:
        k = invstd * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    n = tl.full([BLOCK_C], count, ACC)
    mean_dy = _divide(tl.load(sum_dy_ptr + cols, mask=col_ok, other=0.0).to(ACC), n, ACC)
    proj = _divide(tl.load(sum_dy_xhat_ptr + cols, mask=col_ok, other=0.0).to(ACC) * invstd, n,
                   ACC)
    g = _masked_grad(dy_ptr, y_ptr, offsets, ok, MASKED, ACC)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(ACC)
    dx = k[None, :] * (g - mean_dy[None, :] - (x - mean[None, :]) * proj[None, :])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _prepare(grad_out, output, input):
    x = dense(input)
    return match_layout(grad_out, x), match_layout(output, x), x


@torch.library.custom_op("fusedres_triton::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad_out: torch.Tensor, output: Optional[torch.Tensor],
                               input: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check("batch_norm_backward_reduce", grad_out, output, input, mean, invstd)
    dy, y, x = _prepare(grad_out, output, input)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return (torch.zeros(C, dtype=acc, device=x.device),
                torch.zeros(C, dtype=acc, device=x.device))
    sum_dy = torch.empty(C, dtype=acc, device=x.device)
    sum_dy_xhat = torch.empty(C, dtype=acc, device=x.device)
    programs, rows_per_program = row_split(rows, C, x.device)
    partials = torch.empty(2, programs, C, dtype=acc, device=x.device)
    launch(_reduce_partial_kernel, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs),
           x.device, dy, y if y is not None else dy, x, mean.contiguous(), partials, rows, C,
           inner, rows_per_program, MASKED=y is not None, CHANNELS_LAST=inner == 1,
           ACC=tl_acc(x.dtype))
    launch(_reduce_merge_kernel, (triton.cdiv(C, 32),), x.device, partials, invstd.contiguous(),
           sum_dy, sum_dy_xhat, programs, C, ACC=tl_acc(x.dtype), BLOCK_P=MERGE_ROWS,
           BLOCK_C=32)
    return sum_dy, sum_dy_xhat


@torch.library.custom_op("fusedres_triton::batch_norm_backward_input", mutates_args=())
def batch_norm_backward_input(grad_out: torch.Tensor, output: Optional[torch.Tensor],
                              input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                              weight: Optional[torch.Tensor], sum_dy: torch.Tensor,
                              sum_dy_xhat: torch.Tensor) -> torch.Tensor:
    check("batch_norm_backward_input", grad_out, output, input, mean, invstd, weight, sum_dy,
          sum_dy_xhat)
    dy, y, x = _prepare(grad_out, output, input)
    grad_input = torch.empty_like(x)
    if x.numel() == 0:
        return grad_input
    rows, C, inner = channel_view(x)
    launch(
        _input_grad_kernel, tile_grid(rows, C), x.device,
        dy, y if y is not None else dy, x, grad_input, mean.contiguous(), invstd.contiguous(),
        weight.contiguous() if weight is not None else invstd, sum_dy.contiguous(),
        sum_dy_xhat.contiguous(), x.numel() // C, rows, C, inner, MASKED=y is not None,
        HAS_WEIGHT=weight is not None, CHANNELS_LAST=inner == 1, ACC=tl_acc(x.dtype))
    return grad_input
