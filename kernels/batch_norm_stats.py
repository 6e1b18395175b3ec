"""Triton: per-channel mean and biased variance, fp32 (fp64 for fp64 inputs).

Each program walks its share of the rows in (BLOCK_R, BLOCK_C) tiles, takes exact
two-pass moments of each tile in registers and merges them into running (count, mean, M2)
with Chan's formula; a second kernel merges the programs' partials the same way. Never
E[x^2] - E[x]^2. Every value is first shifted by its channel's first value, so the partial
means are small offsets kept to full precision (a mean of 3e4 has a float ulp of 0.002,
which merged partial means would carry into the variance); the shift is added back last.

add_batch_norm_stats: the same statistics of input + residual, whose sum (rounded to the
dtype, as the add would be) the partial kernel writes as it reads both.

For the training ops the merge also writes the BN coefficients and moves nn.BatchNorm2d's
running statistics, and the partial kernel counts the batch (channel_stats' affine and
running arguments): no per-channel torch ops before or after.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedres._ops import check, dense, match_layout
from fusedres.reference import train_coefficients

from ._common import (TILE_CONFIGS, TILE_FIXED, TILE_INTERPRETED, TILE_KEY, acc_dtype, autotuned,
                      channel_view, float_pair, launch, round_to, row_split, tile_offsets,
                      tl_acc)


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


@triton.jit
def load_values(x_ptr, z_ptr, offsets, mask, ADD: tl.constexpr, ACC: tl.constexpr):
    """x at offsets, or with ADD x + z in the add's precision (ACC), rounded to x's dtype."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if ADD:
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
        x = round_to(x.to(ACC) + z.to(ACC), x_ptr.dtype.element_ty)
    return x


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED, restore=["counter_ptr"])
@triton.jit
def _stats_partial_kernel(x_ptr, z_ptr, sum_ptr, part_ptr, counter_ptr, rows, C, inner,
                          rows_per_program, ADD: tl.constexpr, COUNT: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # ADD: the statistics of x + z, which this kernel writes to sum. COUNT: one program adds
    # the batch to the counter (num_batches_tracked), which the merge after it reads.
    # grid: (channel blocks, row programs); the channel blocks, up to C / 8, on the x axis
    # (2**31 - 1), the few row programs on y (65535).
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_r = tl.program_id(1).to(tl.int64)
    if COUNT:
        if (tl.program_id(0) == 0) & (pid_r == 0):
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    shift = channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD, CHANNELS_LAST, ACC)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < end
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = tile_offsets(r, cols, C, inner, CHANNELS_LAST)
        x = load_values(x_ptr, z_ptr, offsets, ok, ADD, ACC)
        if ADD:
            tl.store(sum_ptr + offsets, x, mask=ok)
        x = x.to(ACC)
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
def channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """Each channel's first value (sample 0, position 0; with ADD of x + z, computed again
    rather than read back from the sum another program writes), or 0 where that is Inf / NaN
    (x - Inf would turn an Inf into NaN): the shift of its statistics."""
    offsets = cols if CHANNELS_LAST else cols * inner
    shift = load_values(x_ptr, z_ptr, offsets, col_ok, ADD, ACC).to(ACC)
    return tl.where(tl.abs(shift) < float("inf"), shift, 0.0)


@triton.jit
def tile_moments(n, mean, m2, ok):
    """(count, mean, M2) of the union of a tile's rows of moments (rows where `ok` is off
    count nothing), in closed form: every row at once, no chain of merges. With an Inf or NaN
    among the means, the mean is what a sum would give and M2 NaN, as chan_merge."""
    n = tl.where(ok, n, 0.0)
    total = tl.sum(n, axis=0)
    weighted = tl.where(ok, n * mean, 0.0)
    tile_mean = tl.sum(weighted, axis=0) / tl.where(total > 0, total, 1.0)
    d = tl.where(ok, mean - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(tl.where(ok, m2, 0.0) + n * d * d, axis=0)
    # (a NaN mean is not < inf either)
    bad = tl.where(ok & (tl.abs(mean) < float("inf")), 0, tl.where(ok, 1, 0))
    finite = tl.sum(bad, axis=0) == 0
    return total, tile_mean, tl.where(finite, tile_m2, float("nan"))


# Partial rows a merge program combines at once (tile_moments): a serial merge of hundreds of
# partials is a chain of dependent divisions per channel.
MERGE_ROWS = 64


@triton.jit
def lerp_to(ptr, cols, col_ok, target, weight, ACC: tl.constexpr):
    """ptr[cols] (a running statistic, in its own dtype) moved by `weight` towards target,
    as torch.lerp computes it (two forms, exact at weight 0 and 1)."""
    v = tl.load(ptr + cols, mask=col_ok, other=0.0).to(ACC)
    out = tl.where(weight < 0.5, v + weight * (target - v), target - (target - v) * (1.0 - weight))
    tl.store(ptr + cols, out.to(ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _stats_merge_kernel(part_ptr, mean_ptr, var_ptr, programs, plane, C, x_ptr, z_ptr, inner,
                        weight_ptr, bias_ptr, invstd_ptr, scale_ptr, shift_ptr,
                        running_mean_ptr, running_var_ptr, counter_ptr, eps_hi, eps_lo,
                        momentum_hi, momentum_lo, bessel_hi, bessel_lo,
                        SHIFTED: tl.constexpr, ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                        ACC: tl.constexpr,
                        AFFINE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the first `programs` partial rows of [3][rows][C] (`plane` = rows * C values
    apart), BLOCK_P rows at a time (tile_moments); SHIFTED: their means are offsets from x's
    first values (with ADD: from those of x + z). AFFINE: also writes the BN's invstd =
    1 / sqrt(var + eps), scale = weight * invstd and shift = bias (0 without one), so no
    per-channel torch ops follow. eps = eps_hi + eps_lo (float_pair: exact in float64), as
    the momentum and bessel = M / (M - 1). RUNNING: updates the running statistics as
    nn.BatchNorm2d: factor = momentum, or with CUMULATIVE 1 / the counter (which the partial
    kernel has counted the batch in)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < programs)[:, None] & col_ok[None, :]
        part = part_ptr + p[:, None] * C + cols[None, :]
        tile_n, tile_mean, tile_m2 = tile_moments(
            tl.load(part, mask=ok, other=0.0), tl.load(part + plane, mask=ok, other=0.0),
            tl.load(part + 2 * plane, mask=ok, other=0.0), ok)
        n, mean, m2 = chan_merge(n, mean, m2, tile_n, tile_mean, tile_m2)
    if SHIFTED:
        mean += channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD, CHANNELS_LAST, ACC)
    var = tl.where(n > 0, m2 / tl.where(n > 0, n, 1.0), 0.0)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(var_ptr + cols, var, mask=col_ok)
    if AFFINE:
        var_eps = var + eps_hi + eps_lo
        if ACC == tl.float64:
            invstd = 1.0 / tl.sqrt(var_eps)  # (IEEE-rounded in float64)
        else:
            invstd = tl.math.div_rn(tl.full(var.shape, 1.0, ACC), tl.sqrt_rn(var_eps))
        tl.store(invstd_ptr + cols, invstd, mask=col_ok)
        scale = invstd
        if HAS_WEIGHT:
            scale = invstd * tl.load(weight_ptr + cols, mask=col_ok, other=1.0).to(ACC)
        tl.store(scale_ptr + cols, scale, mask=col_ok)
        shift = tl.zeros([BLOCK_C], ACC)
        if HAS_BIAS:
            shift = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(shift_ptr + cols, shift, mask=col_ok)
    if RUNNING:
        factor = tl.zeros([BLOCK_C], ACC)  # (in ACC: the pair's halves add up in float64)
        if CUMULATIVE:
            factor += 1.0 / tl.load(counter_ptr).to(ACC)
        else:
            factor += momentum_hi
            factor += momentum_lo
        lerp_to(running_mean_ptr, cols, col_ok, mean, factor, ACC)
        unbiased = var * bessel_hi + var * bessel_lo
        lerp_to(running_var_ptr, cols, col_ok, unbiased, factor, ACC)


def merge_stats(partials, programs, x, inner, affine=None, out=None, residual=None,
                running=None):
    """(mean, var) from the [3][rows][C] partials of x's statistics (x: the tensor whose first
    values shifted them, or None if unshifted; with residual, x + residual's), written into
    `out` if given; with affine = (weight, bias, eps) also (invstd, scale, shift) as
    batch_norm_act_train returns them; with running = (running_mean, running_var, counter,
    momentum, count) also updates those (RunningStats of csrc/channel_stats.h). One launch."""
    _, rows, C = partials.shape
    mean, var = out if out is not None else (
        torch.empty(C, dtype=partials.dtype, device=partials.device) for _ in range(2))
    weight, bias, eps = affine if affine is not None else (None, None, 0.0)
    invstd, scale, shift = (torch.empty_like(mean) for _ in range(3)) if affine is not None \
        else (None, None, None)
    running_mean, running_var, counter, momentum, count = running or (None, None, None, 0.0, 2)
    dummy = partials  # stands in for absent pointers; never read
    launch(_stats_merge_kernel, (triton.cdiv(C, 32),), partials.device, partials, mean, var,
           programs, rows * C, C, x if x is not None else dummy,
           residual if residual is not None else dummy, inner,
           *[t if t is not None else dummy
             for t in (weight, bias, invstd, scale, shift, running_mean, running_var, counter)],
           *float_pair(eps), *float_pair(momentum or 0.0), *float_pair(count / (count - 1)),
           SHIFTED=x is not None, ADD=residual is not None, CHANNELS_LAST=inner == 1,
           ACC=tl_acc(partials.dtype),
           AFFINE=affine is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
           RUNNING=running_mean is not None, CUMULATIVE=momentum is None,
           BLOCK_P=MERGE_ROWS, BLOCK_C=32)
    return (mean, var) if affine is None else (mean, var, invstd, scale, shift)


@torch.library.custom_op("fusedres_triton::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check("batch_norm_stats", input)
    return channel_stats(input)


@torch.library.custom_op("fusedres_triton::add_batch_norm_stats", mutates_args=())
def add_batch_norm_stats(input: torch.Tensor, residual: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check("add_batch_norm_stats", input, residual)
    return channel_stats(input, residual=residual)


def channel_stats(input: torch.Tensor, affine=None, residual=None, running=None):
    """The launches of batch_norm_stats, on arguments already checked (the training ops):
    (mean, var), and with affine = (weight, bias, eps) also the BN's (invstd, scale, shift).
    With residual: the statistics of input + residual, and the sum first: (sum, mean, ...).
    running = (running_mean, running_var, counter, momentum) (each but momentum may be None):
    nn.BatchNorm2d's running statistics, updated (the training ops' RunningStats)."""
    running_mean, running_var, counter, momentum = running or (None, None, None, 0.1)
    x = dense(input)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    z = match_layout(residual, x)
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        mean, var = torch.zeros(C, dtype=acc, device=x.device), torch.zeros(C, dtype=acc,
                                                                            device=x.device)
        statistics = (mean, var) if affine is None else (
            mean, var, *train_coefficients(var, *affine))
        if counter is not None:  # an empty batch is counted, and changes nothing else
            counter.add_(1)
    else:
        programs, rows_per_program = row_split(rows, C, x.device)
        partials = torch.empty(3, programs, C, dtype=acc, device=x.device)
        launch(_stats_partial_kernel, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs),
               x.device, x, z if z is not None else x, total if total is not None else x,
               partials, counter if counter is not None else partials, rows, C, inner,
               rows_per_program, ADD=z is not None, COUNT=counter is not None,
               CHANNELS_LAST=inner == 1, ACC=tl_acc(x.dtype))
        statistics = merge_stats(
            partials, programs, x, inner, affine, residual=z,
            running=(running_mean, running_var, counter, momentum, rows)
            if running_mean is not None else None)
    return statistics if residual is None else (total, *statistics)
