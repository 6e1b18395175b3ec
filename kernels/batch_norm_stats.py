"""Triton: per-channel mean and biased variance, fp32 (fp64 for fp64 inputs).

Each program walks its share of the rows in (BLOCK_R, BLOCK_C) tiles, takes exact
two-pass moments of each tile in registers and merges them into running (count, mean, M2)
with Chan's formula; a second kernel merges the programs' partials the same way. Never
E[x^2] - E[x]^2. Every value is first shifted by its channel's first value, so the partial
means are small offsets kept to full precision (a mean of 3e4 has a float ulp of 0.002,
which merged partial means would carry into the variance); the shift is added back last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedres._ops import check, dense

from ._common import (TILE_CONFIGS, TILE_FIXED, TILE_INTERPRETED, TILE_KEY, acc_dtype, autotuned,
                      channel_view, launch, row_split, tile_offsets, tl_acc)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Moments of the union of two sets, from each set's (count, mean, M2). With an Inf or
    NaN among the values the mean is what a sum would give (Inf + x = Inf, Inf - Inf = NaN)
    and M2 NaN, as PyTorch's batch norm."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    finite = (tl.abs(mean_a) < float("inf")) & (tl.abs(mean_b) < float("inf"))
    mean = tl.where(finite, mean_a + delta * w_b, mean_a + mean_b)
    m2 = tl.where(finite, m2_a + m2_b + delta * delta * n_a * w_b, float("nan"))
    return n, mean, m2


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED)
@triton.jit
def _stats_partial_kernel(x_ptr, part_ptr, rows, C, inner, rows_per_program,
                          CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (channel blocks, row programs); the channel blocks, up to C / 8, on the x axis
    # (2**31 - 1), the few row programs on y (65535).
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_r = tl.program_id(1).to(tl.int64)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    shift = channel_shift(x_ptr, cols, col_ok, inner, CHANNELS_LAST, ACC)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < end
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + tile_offsets(r, cols, C, inner, CHANNELS_LAST), mask=ok,
                    other=0.0).to(ACC)
        x = tl.where(ok, x - shift[None, :], 0.0)
        count = tl.sum(row_ok.to(ACC), axis=0)
        tile_mean = tl.sum(x, axis=0) / count
        d = tl.where(ok, x - tile_mean[None, :], 0.0)
        n, mean, m2 = chan_merge(n, mean, m2, count, tile_mean, tl.sum(d * d, axis=0))
    out = part_ptr + pid_r * C + cols
    programs = tl.num_programs(1).to(tl.int64)
    tl.store(out, n, mask=col_ok)
    tl.store(out + programs * C, mean, mask=col_ok)
    tl.store(out + 2 * programs * C, m2, mask=col_ok)


@triton.jit
def channel_shift(x_ptr, cols, col_ok, inner, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """Each channel's first value (sample 0, position 0), or 0 where that is Inf / NaN
    (x - Inf would turn an Inf into NaN): the shift of its statistics."""
    offsets = cols if CHANNELS_LAST else cols * inner
    shift = tl.load(x_ptr + offsets, mask=col_ok, other=0.0).to(ACC)
    return tl.where(tl.abs(shift) < float("inf"), shift, 0.0)


@triton.jit
def _stats_merge_kernel(part_ptr, mean_ptr, var_ptr, programs, plane, C, x_ptr, inner,
                        SHIFTED: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Merges the first `programs` partial rows of [3][rows][C] (`plane` = rows * C values
    apart); SHIFTED: their means are offsets from x's first values."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for p in range(0, programs):
        part = part_ptr + p * C + cols
        n, mean, m2 = chan_merge(
            n, mean, m2,
            tl.load(part, mask=col_ok, other=0.0),
            tl.load(part + plane, mask=col_ok, other=0.0),
            tl.load(part + 2 * plane, mask=col_ok, other=0.0),
        )
    if SHIFTED:
        mean += channel_shift(x_ptr, cols, col_ok, inner, CHANNELS_LAST, ACC)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(var_ptr + cols, tl.where(n > 0, m2 / tl.where(n > 0, n, 1.0), 0.0), mask=col_ok)


@torch.library.custom_op("fusedres_triton::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check("batch_norm_stats", input)
    return channel_stats(input)


def channel_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The launches of batch_norm_stats, on arguments already checked (the training ops)."""
    x = dense(input)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    mean = torch.zeros(C, dtype=acc, device=x.device)
    var = torch.zeros(C, dtype=acc, device=x.device)
    if x.numel() == 0:
        return mean, var
    programs, rows_per_program = row_split(rows, C, x.device)
    partials = torch.empty(3, programs, C, dtype=acc, device=x.device)
    launch(_stats_partial_kernel, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs),
           x.device, x, partials, rows, C, inner, rows_per_program, CHANNELS_LAST=inner == 1,
           ACC=tl_acc(x.dtype))
    launch(_stats_merge_kernel, (triton.cdiv(C, 32),), x.device, partials, mean, var, programs,
           programs * C, C, x, inner, SHIFTED=True, CHANNELS_LAST=inner == 1,
           ACC=tl_acc(x.dtype), BLOCK_C=32)
    return mean, var
