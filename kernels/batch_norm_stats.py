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
                      channel_view, float_pair, inverse_std, launch, round_to, row_split,
                      tile_offsets, tl_acc)


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


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED,
           restore=["counter_ptr", "second_counter_ptr"])
@triton.jit
def _stats_partial_kernel(x_ptr, z_ptr, sum_ptr, part_ptr, counter_ptr, second_ptr,
                          second_counter_ptr, rows, C, INNER: tl.constexpr, rows_per_program,
                          ADD: tl.constexpr,
                          COUNT: tl.constexpr, SECOND_COUNT: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # ADD: the statistics of x + z, which this kernel writes to sum. COUNT: one program adds
    # the batch to the counter (num_batches_tracked), which the merge after it reads.
    # grid: (channel blocks, row programs, tensors); the channel blocks, up to C / 8, on the x
    # axis (2**31 - 1), the few row programs on y (65535). The dual form's second tensor
    # (second_ptr, of x's shape and layout) is read by the programs of axis 2 == 1, into the
    # second half of the partials, and counted in second_counter (SECOND_COUNT).
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_r = tl.program_id(1).to(tl.int64)
    programs = tl.num_programs(1).to(tl.int64)
    first = (tl.program_id(0) == 0) & (pid_r == 0)
    if tl.program_id(2) == 0:
        src_ptr = x_ptr
        if COUNT:
            if first:
                tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    else:
        src_ptr = second_ptr
        part_ptr += 3 * programs * C
        if SECOND_COUNT:
            if first:
                tl.store(second_counter_ptr, tl.load(second_counter_ptr) + 1)
    col_ok = cols < C
    shift = channel_shift(src_ptr, z_ptr, cols, col_ok, INNER, ADD, ACC)
    # Each register slot (row lane, channel) sums the values it sees, shifted, as a CUDA thread
    # does; the slots' moments are combined once, after the loop (no reduction across the
    # program's threads per tile).
    count = tl.zeros([BLOCK_R], ACC)  # the values each row lane summed
    s1 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < end
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = tile_offsets(r, cols, C, INNER)
        x = load_values(src_ptr, z_ptr, offsets, ok, ADD, ACC)
        if ADD:
            tl.store(sum_ptr + offsets, x, mask=ok)
        x = tl.where(ok, x.to(ACC) - shift[None, :], 0.0)
        count += row_ok.to(ACC)
        s1 += x
        s2 += x * x
    n, mean, m2 = slot_moments(count, s1, s2, col_ok)
    out = part_ptr + pid_r * C + cols
    tl.store(out, n, mask=col_ok)
    tl.store(out + programs * C, mean, mask=col_ok)
    tl.store(out + 2 * programs * C, m2, mask=col_ok)


@triton.jit
def channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD: tl.constexpr, ACC: tl.constexpr):
    """Each channel's first value (sample 0, position 0; with ADD of x + z, computed again
    rather than read back from the sum another program writes), or 0 where that is Inf / NaN
    (x - Inf would turn an Inf into NaN): the shift of its statistics."""
    offsets = cols * inner
    shift = load_values(x_ptr, z_ptr, offsets, col_ok, ADD, ACC).to(ACC)
    return tl.where(tl.abs(shift) < float("inf"), shift, 0.0)


@triton.jit
def slot_moments(count, s1, s2, col_ok):
    """(count, mean, M2) per channel from a tile of register slots' shifted sums s1, s2 of
    count[row lane] values each: each slot's moments (M2 = s2 - s1 * mean, NaN with an Inf or
    NaN among its values, as CUDA's ShiftedSums), then their union (tile_moments)."""
    n = tl.broadcast_to(count[:, None], s1.shape)
    mean = s1 / tl.where(n > 0, n, 1.0)
    v = s2 - s1 * mean
    m2 = tl.where(tl.abs(mean) < float("inf"), tl.where(v < 0.0, 0.0, v), float("nan"))
    return tile_moments(n, mean, m2, (n > 0) & col_ok[None, :])


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
def _merge_channels(part_ptr, programs, plane, C, inner, x_ptr, z_ptr, mean_ptr, var_ptr,
                    weight_ptr, bias_ptr, invstd_ptr, scale_ptr, shift_ptr, running_mean_ptr,
                    running_var_ptr, counter_ptr, eps_hi, eps_lo, momentum_hi, momentum_lo,
                    bessel_hi, bessel_lo, SHIFTED: tl.constexpr, ADD: tl.constexpr,
                    ACC: tl.constexpr, AFFINE: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING: tl.constexpr,
                    CUMULATIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """_stats_merge_kernel's work for one tensor's statistics."""
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
        mean += channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD, ACC)
    var = tl.where(n > 0, m2 / tl.where(n > 0, n, 1.0), 0.0)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(var_ptr + cols, var, mask=col_ok)
    if AFFINE:
        invstd = inverse_std(var, eps_hi, eps_lo, ACC)
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


# The arguments _stats_merge_kernel takes for each tensor's statistics (the second's: b_*).
_MERGE_ARGS = ("x_ptr", "z_ptr", "mean_ptr", "var_ptr", "weight_ptr", "bias_ptr", "invstd_ptr",
               "scale_ptr", "shift_ptr", "running_mean_ptr", "running_var_ptr", "counter_ptr",
               "eps_hi", "eps_lo", "momentum_hi", "momentum_lo", "bessel_hi", "bessel_lo",
               "SHIFTED", "ADD", "AFFINE", "HAS_WEIGHT", "HAS_BIAS", "RUNNING", "CUMULATIVE")


@triton.jit
def _stats_merge_kernel(part_ptr, programs, plane, C, inner,
                        x_ptr, z_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, invstd_ptr,
                        scale_ptr, shift_ptr, running_mean_ptr, running_var_ptr, counter_ptr,
                        eps_hi, eps_lo, momentum_hi, momentum_lo, bessel_hi, bessel_lo,
                        b_x_ptr, b_z_ptr, b_mean_ptr, b_var_ptr, b_weight_ptr, b_bias_ptr,
                        b_invstd_ptr, b_scale_ptr, b_shift_ptr, b_running_mean_ptr,
                        b_running_var_ptr, b_counter_ptr, b_eps_hi, b_eps_lo, b_momentum_hi,
                        b_momentum_lo, b_bessel_hi, b_bessel_lo,
                        SHIFTED: tl.constexpr, ADD: tl.constexpr, AFFINE: tl.constexpr,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
                        b_SHIFTED: tl.constexpr, b_ADD: tl.constexpr, b_AFFINE: tl.constexpr,
                        b_HAS_WEIGHT: tl.constexpr, b_HAS_BIAS: tl.constexpr,
                        b_RUNNING: tl.constexpr, b_CUMULATIVE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the first `programs` partial rows of [3][rows][C] (`plane` = rows * C values
    apart), BLOCK_P rows at a time (tile_moments); SHIFTED: their means are offsets from x's
    first values (with ADD: from those of x + z). AFFINE: also writes the BN's invstd =
    1 / sqrt(var + eps), scale = weight * invstd and shift = bias (0 without one), so no
    per-channel torch ops follow. eps = eps_hi + eps_lo (float_pair: exact in float64), as
    the momentum and bessel = M / (M - 1). RUNNING: updates the running statistics as
    nn.BatchNorm2d: factor = momentum, or with CUMULATIVE 1 / the counter (which the partial
    kernel has counted the batch in).
    grid: (channel blocks, tensors): the programs of axis 1 == 1 merge the dual form's second
    tensor's partials (the next [3][rows][C]) with the b_* arguments, as the others do with
    theirs."""
    if tl.program_id(1) == 0:
        _merge_channels(part_ptr, programs, plane, C, inner, x_ptr, z_ptr, mean_ptr, var_ptr,
                        weight_ptr, bias_ptr, invstd_ptr, scale_ptr, shift_ptr,
                        running_mean_ptr, running_var_ptr, counter_ptr, eps_hi, eps_lo,
                        momentum_hi, momentum_lo, bessel_hi, bessel_lo, SHIFTED, ADD,
                        ACC, AFFINE, HAS_WEIGHT, HAS_BIAS, RUNNING, CUMULATIVE,
                        BLOCK_P, BLOCK_C)
    else:
        _merge_channels(part_ptr + 3 * plane, programs, plane, C, inner, b_x_ptr, b_z_ptr,
                        b_mean_ptr, b_var_ptr, b_weight_ptr, b_bias_ptr, b_invstd_ptr,
                        b_scale_ptr, b_shift_ptr, b_running_mean_ptr, b_running_var_ptr,
                        b_counter_ptr, b_eps_hi, b_eps_lo, b_momentum_hi, b_momentum_lo,
                        b_bessel_hi, b_bessel_lo, b_SHIFTED, b_ADD, ACC,
                        b_AFFINE, b_HAS_WEIGHT, b_HAS_BIAS, b_RUNNING, b_CUMULATIVE, BLOCK_P,
                        BLOCK_C)


def _merge_outputs(partials, x, inner, affine, out, residual, running):
    """The outputs of one tensor's merge (mean, var, and with affine invstd, scale, shift)
    and _stats_merge_kernel's arguments for it (_MERGE_ARGS)."""
    C = partials.shape[-1]
    mean, var = out if out is not None else (
        torch.empty(C, dtype=partials.dtype, device=partials.device) for _ in range(2))
    weight, bias, eps = affine if affine is not None else (None, None, 0.0)
    invstd, scale, shift = (torch.empty_like(mean) for _ in range(3)) if affine is not None \
        else (None, None, None)
    running_mean, running_var, counter, momentum, count = running or (None, None, None, 0.0, 2)
    dummy = partials  # stands in for absent pointers; never read
    pointers = [x, residual, mean, var, weight, bias, invstd, scale, shift, running_mean,
                running_var, counter]
    values = ([t if t is not None else dummy for t in pointers]
              + [*float_pair(eps), *float_pair(momentum or 0.0), *float_pair(count / (count - 1)),
                 x is not None, residual is not None, affine is not None, weight is not None,
                 bias is not None, running_mean is not None, momentum is None])
    outputs = (mean, var) if affine is None else (mean, var, invstd, scale, shift)
    return outputs, dict(zip(_MERGE_ARGS, values))


def merge_stats(partials, programs, x, inner, affine=None, out=None, residual=None,
                running=None, second=None):
    """(mean, var) from the [(1,) 3, rows, C] partials of x's statistics (x: the tensor whose first
    values shifted them, or None if unshifted; with residual, x + residual's), written into
    `out` if given; with affine = (weight, bias, eps) also (invstd, scale, shift) as
    batch_norm_act_train returns them; with running = (running_mean, running_var, counter,
    momentum, count) also updates those (RunningStats of csrc/channel_stats.h). One launch.
    second: the dual form's second tensor's (x, affine, running), whose partials follow x's
    ([2][3][rows][C]): the same launch merges them, and returns both tensors' outputs."""
    rows, C = partials.shape[-2:]
    outputs, args = _merge_outputs(partials, x, inner, affine, out, residual, running)
    if second is not None:
        y, y_affine, y_running = second
        second_outputs, second_args = _merge_outputs(partials, y, inner, y_affine, None, None,
                                                     y_running)
    else:
        second_outputs, second_args = None, args
    launch(_stats_merge_kernel, (triton.cdiv(C, 32), 1 if second is None else 2),
           partials.device, partials, programs, rows * C, C, inner, **args,
           **{"b_" + k: v for k, v in second_args.items()},
           ACC=tl_acc(partials.dtype), BLOCK_P=MERGE_ROWS, BLOCK_C=32)
    return outputs if second is None else (outputs, second_outputs)


@torch.library.custom_op("fusedres_triton::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check("batch_norm_stats", input)
    return channel_stats(input)


@torch.library.custom_op("fusedres_triton::add_batch_norm_stats", mutates_args=())
def add_batch_norm_stats(input: torch.Tensor, residual: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check("add_batch_norm_stats", input, residual)
    return channel_stats(input, residual=residual)


def channel_stats(input: torch.Tensor, affine=None, residual=None, running=None, second=None):
    """The launches of batch_norm_stats, on arguments already checked (the training ops):
    (mean, var), and with affine = (weight, bias, eps) also the BN's (invstd, scale, shift).
    With residual: the statistics of input + residual, and the sum first: (sum, mean, ...).
    running = (running_mean, running_var, counter, momentum) (each but momentum may be None):
    nn.BatchNorm2d's running statistics, updated (the training ops' RunningStats).
    second = (tensor, affine, running): the dual form's second BN (no residual then), of a
    tensor of input's shape: the same two launches give both BNs' statistics, returned as a
    pair of tuples."""
    x = dense(input)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    z = match_layout(residual, x)
    y = match_layout(second[0], x) if second is not None else None
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        statistics = _empty_statistics(x, affine, running)
        if second is not None:
            statistics = (statistics, _empty_statistics(y, *second[1:]))
    else:
        counters = [r[2] if r is not None else None
                    for r in (running, second[2] if second is not None else None)]
        programs, rows_per_program = row_split(rows, C, x.device)
        partials = torch.empty(1 if second is None else 2, 3, programs, C, dtype=acc,
                               device=x.device)
        launch(_stats_partial_kernel,
               lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs,
                             1 if second is None else 2),
               x.device, x, z if z is not None else x, total if total is not None else x,
               partials, counters[0] if counters[0] is not None else partials,
               y if y is not None else x, counters[1] if counters[1] is not None else partials,
               rows, C, inner, rows_per_program, ADD=z is not None,
               COUNT=counters[0] is not None, SECOND_COUNT=counters[1] is not None,
               ACC=tl_acc(x.dtype))
        statistics = merge_stats(
            partials, programs, x, inner, affine, residual=z,
            running=_merge_running(running, rows), second=(y, second[1], _merge_running(second[2], rows))
            if second is not None else None)
    return statistics if residual is None else (total, *statistics)


def _merge_running(running, rows):
    """merge_stats' running = (..., count) from the ops' (running_mean, running_var, counter,
    momentum), or None without running statistics."""
    if running is None or running[0] is None:
        return None
    return (*running, rows)


def _empty_statistics(x, affine, running):
    """The statistics of an empty x: zeros, and its coefficients; the batch is counted and
    changes nothing else."""
    C = x.shape[1]
    mean = torch.zeros(C, dtype=acc_dtype(x.dtype), device=x.device)
    var = torch.zeros_like(mean)
    counter = running[2] if running is not None else None
    if counter is not None:
        counter.add_(1)
    return (mean, var) if affine is None else (mean, var, *train_coefficients(var, *affine))
