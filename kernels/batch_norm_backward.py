"""Triton: the training BN backward in two passes over (grad_out, output, input):
  reduce: sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) per channel (and g itself, written
          in the same pass, with write_grad)
  input:  grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M)
g = grad_out, zeroed where the forward's output is <= 0 (the ReLU mask: read from the saved
output, or recomputed from input with the forward's scale and shift); xhat = (input - mean) *
invstd. The reduce pass writes one partial per program, summed by a
second kernel in a fixed order (deterministic, no atomics).

dual_batch_norm_backward: the same three launches for both BNs of relu(bn(x) + bn_r(r)): the
reduce also sums g * (r - r_mean), the merge writes both BNs' sums, and the input pass writes
both gradients from one read of (grad_out, output, x, r).
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
from .batch_norm_apply import affine_value
from .batch_norm_stats import MERGE_ROWS

# Where the ReLU mask comes from (the MASK constexpr): none, the saved output, or the forward's
# output recomputed from x with its mean, scale and shift.
NO_MASK = tl.constexpr(0)
OUTPUT_MASK = tl.constexpr(1)
RECOMPUTED_MASK = tl.constexpr(2)


@triton.jit
def _masked_grad(dy_ptr, y_ptr, offsets, ok, x, mean, scale, shift, MASK: tl.constexpr,
                 ACC: tl.constexpr):
    """g passes where !(y <= 0), as threshold_backward; y the saved output or the forward's
    output recomputed from x as _normalize_kernel computed and stored it."""
    g = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(ACC)
    if MASK == OUTPUT_MASK:
        y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(ACC)
        g = tl.where(y <= 0.0, 0.0, g)
    elif MASK == RECOMPUTED_MASK:
        v = affine_value(x, mean[None, :], scale[None, :], shift[None, :])
        v = tl.where(v < 0.0, 0.0, v)
        y = v.to(dy_ptr.dtype.element_ty).to(ACC)  # the stored output's rounding
        g = tl.where(y <= 0.0, 0.0, g)
    return g


@triton.jit
def _mask_coefficients(scale_ptr, shift_ptr, cols, col_ok, MASK: tl.constexpr,
                       HAS_SHIFT: tl.constexpr, ACC: tl.constexpr):
    scale = tl.full(cols.shape, 1.0, ACC)
    shift = tl.zeros(cols.shape, ACC)
    if MASK == RECOMPUTED_MASK:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=1.0).to(ACC)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    return scale, shift


@autotuned(TILE_CONFIGS, TILE_KEY, TILE_FIXED, TILE_INTERPRETED)
@triton.jit
def _reduce_partial_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, part_ptr, g_ptr,
                           r_ptr, r_mean_ptr, rows, C, INNER: tl.constexpr, rows_per_program,
                           MASK: tl.constexpr, HAS_SHIFT: tl.constexpr, WRITE_GRAD: tl.constexpr,
                           DUAL: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid: (channel blocks, row programs), as _stats_partial_kernel. DUAL: also sum(g * (r -
    # r_mean)), the dual form's second BN's, as the partials' third row.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    pid_r = tl.program_id(1).to(tl.int64)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    scale, shift = _mask_coefficients(scale_ptr, shift_ptr, cols, col_ok, MASK, HAS_SHIFT, ACC)
    r_mean = tl.zeros([BLOCK_C], ACC)
    if DUAL:
        r_mean = tl.load(r_mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    # per register slot (row lane, channel), summed across the program's threads once, after
    # the loop
    sum_g = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    sum_gr = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < end)[:, None] & col_ok[None, :]
        offsets = tile_offsets(r, cols, C, INNER)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(ACC)
        g = _masked_grad(dy_ptr, y_ptr, offsets, ok, x, mean, scale, shift, MASK, ACC)
        if WRITE_GRAD:  # exact: g is grad_out's value or 0
            tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=ok)
        sum_g += g
        sum_gx += g * tl.where(ok, x - mean[None, :], 0.0)
        if DUAL:
            r = tl.load(r_ptr + offsets, mask=ok, other=0.0).to(ACC)
            sum_gr += g * tl.where(ok, r - r_mean[None, :], 0.0)
    out = part_ptr + pid_r * C + cols
    programs = tl.num_programs(1).to(tl.int64)
    tl.store(out, tl.sum(sum_g, axis=0), mask=col_ok)
    tl.store(out + programs * C, tl.sum(sum_gx, axis=0), mask=col_ok)
    if DUAL:
        tl.store(out + 2 * programs * C, tl.sum(sum_gr, axis=0), mask=col_ok)


@triton.jit
def _reduce_merge_kernel(part_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr, grad_weight_ptr,
                         grad_bias_ptr, r_invstd_ptr, sum_dy_rhat_ptr, r_grad_weight_ptr,
                         r_grad_bias_ptr, programs, C, ACC: tl.constexpr, GRADS: tl.constexpr,
                         DUAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the partial rows, BLOCK_P at a time as a tree (tl.sum): a serial sum over
    hundreds of rows is a chain of dependent loads and adds per channel. GRADS: also writes
    the sums as the parameters' gradients, in their pointers' dtype. DUAL: the third row too,
    the second BN's sum_dy_rhat and its parameters' gradients (r_*)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    sum_gr = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < programs)[:, None] & col_ok[None, :]
        part = part_ptr + p[:, None] * C + cols[None, :]
        sum_g += tl.sum(tl.load(part, mask=ok, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(part + programs * C, mask=ok, other=0.0), axis=0)
        if DUAL:
            sum_gr += tl.sum(tl.load(part + 2 * programs * C, mask=ok, other=0.0), axis=0)
    _store_sums(sum_g, sum_gx, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr, grad_weight_ptr,
                grad_bias_ptr, cols, col_ok, ACC, GRADS, True)
    if DUAL:  # (sum_dy is the same for both BNs: written once)
        _store_sums(sum_g, sum_gr, r_invstd_ptr, sum_dy_ptr, sum_dy_rhat_ptr, r_grad_weight_ptr,
                    r_grad_bias_ptr, cols, col_ok, ACC, GRADS, False)


@triton.jit
def _store_sums(sum_g, sum_gx, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr, grad_weight_ptr,
                grad_bias_ptr, cols, col_ok, ACC: tl.constexpr, GRADS: tl.constexpr,
                SUM_DY: tl.constexpr):
    """One BN's merged sums: sum_dy (with SUM_DY), sum_dy_xhat = sum(g * (x - mean)) *
    invstd, and with GRADS the same as its parameters' gradients."""
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    if SUM_DY:
        tl.store(sum_dy_ptr + cols, sum_g, mask=col_ok)
    tl.store(sum_dy_xhat_ptr + cols, sum_gx * invstd, mask=col_ok)
    if GRADS:
        tl.store(grad_bias_ptr + cols, sum_g.to(grad_bias_ptr.dtype.element_ty), mask=col_ok)
        tl.store(grad_weight_ptr + cols, (sum_gx * invstd).to(grad_weight_ptr.dtype.element_ty),
                 mask=col_ok)


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
                       sum_dy_ptr, sum_dy_xhat_ptr, scale_ptr, shift_ptr, extra_ptr, r_ptr,
                       dr_ptr, r_mean_ptr, r_invstd_ptr, r_weight_ptr, sum_dy_rhat_ptr, count,
                       rows, C, INNER: tl.constexpr, MASK: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_EXTRA: tl.constexpr, DUAL: tl.constexpr,
                       HAS_R_WEIGHT: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = k * (g - mean_dy - (x - mean) * proj) (+ the extra gradient, with HAS_EXTRA), the
    per-channel k = weight * invstd, mean_dy = sum_dy / count, proj = sum_dy_xhat * invstd /
    count computed here for the tile's channels (no per-channel torch ops before the
    launch). DUAL: also the dual form's second BN's gradient dr, the same of r with its r_*
    vectors, from the same g."""
    rows_, cols = tile_of_program(rows, C, BLOCK_R, BLOCK_C)
    col_ok = cols < C
    ok = (rows_ < rows)[:, None] & col_ok[None, :]
    offsets = tile_offsets(rows_, cols, C, INNER)
    n = tl.full([BLOCK_C], count, ACC)
    mean_dy = _divide(tl.load(sum_dy_ptr + cols, mask=col_ok, other=0.0).to(ACC), n, ACC)
    mean, k, proj = _grad_coefficients(mean_ptr, invstd_ptr, weight_ptr, sum_dy_xhat_ptr, n,
                                       cols, col_ok, HAS_WEIGHT, ACC)
    scale, shift = _mask_coefficients(scale_ptr, shift_ptr, cols, col_ok, MASK, HAS_SHIFT, ACC)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(ACC)
    g = _masked_grad(dy_ptr, y_ptr, offsets, ok, x, mean, scale, shift, MASK, ACC)
    dx = k[None, :] * (g - mean_dy[None, :] - (x - mean[None, :]) * proj[None, :])
    if HAS_EXTRA:
        dx += tl.load(extra_ptr + offsets, mask=ok, other=0.0).to(ACC)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if DUAL:
        r_mean, r_k, r_proj = _grad_coefficients(r_mean_ptr, r_invstd_ptr, r_weight_ptr,
                                                 sum_dy_rhat_ptr, n, cols, col_ok, HAS_R_WEIGHT,
                                                 ACC)
        r = tl.load(r_ptr + offsets, mask=ok, other=0.0).to(ACC)
        dr = r_k[None, :] * (g - mean_dy[None, :] - (r - r_mean[None, :]) * r_proj[None, :])
        tl.store(dr_ptr + offsets, dr.to(dr_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_coefficients(mean_ptr, invstd_ptr, weight_ptr, sum_dy_xhat_ptr, n, cols, col_ok,
                       HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """One BN's per-channel (mean, k = weight * invstd, proj = sum_dy_xhat * invstd / n)."""
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    k = invstd
    if HAS_WEIGHT:
        k = invstd * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    proj = _divide(tl.load(sum_dy_xhat_ptr + cols, mask=col_ok, other=0.0).to(ACC) * invstd, n,
                   ACC)
    return mean, k, proj


def _prepare(grad_out, output, input):
    x = dense(input)
    return match_layout(grad_out, x), match_layout(output, x), x


def _mask_args(y, scale, shift, dy):
    """The kernels' (y, scale, shift) pointers and MASK / HAS_SHIFT constexprs."""
    mask = OUTPUT_MASK if y is not None else RECOMPUTED_MASK if scale is not None else NO_MASK
    mask = mask.value
    pointers = [y if y is not None else dy] + [
        t.contiguous() if t is not None else dy for t in (scale, shift)]
    return pointers, dict(MASK=mask, HAS_SHIFT=shift is not None)


@torch.library.custom_op("fusedres_triton::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(grad_out: torch.Tensor, output: Optional[torch.Tensor],
                               input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               write_grad: bool = False, scale: Optional[torch.Tensor] = None,
                               shift: Optional[torch.Tensor] = None,
                               grad_dtype: Optional[torch.dtype] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    check("batch_norm_backward_reduce", grad_out, output, input, mean, invstd, write_grad, scale,
          shift, grad_dtype)
    dy, y, x = _prepare(grad_out, output, input)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    masked_grad = torch.empty_like(x) if write_grad else x.new_empty(0)
    grad_weight, grad_bias = (torch.empty(C if grad_dtype is not None else 0,
                                          dtype=grad_dtype or acc, device=x.device)
                              for _ in range(2))
    if x.numel() == 0:
        return (torch.zeros(C, dtype=acc, device=x.device),
                torch.zeros(C, dtype=acc, device=x.device), masked_grad, grad_weight.zero_(),
                grad_bias.zero_())
    sum_dy = torch.empty(C, dtype=acc, device=x.device)
    sum_dy_xhat = torch.empty(C, dtype=acc, device=x.device)
    programs, rows_per_program = row_split(rows, C, x.device)
    partials = torch.empty(2, programs, C, dtype=acc, device=x.device)
    (y, scale, shift), mask = _mask_args(y, scale, shift, dy)
    launch(_reduce_partial_kernel, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs),
           x.device, dy, y, x, mean.contiguous(), scale, shift, partials,
           masked_grad if write_grad else dy, x, mean, rows, C, inner, rows_per_program, **mask,
           WRITE_GRAD=write_grad, DUAL=False, ACC=tl_acc(x.dtype))
    grads = (grad_weight, grad_bias) if grad_dtype is not None else (sum_dy, sum_dy)
    launch(_reduce_merge_kernel, (triton.cdiv(C, 32),), x.device, partials, invstd.contiguous(),
           sum_dy, sum_dy_xhat, *grads, *(partials,) * 4, programs, C, ACC=tl_acc(x.dtype),
           GRADS=grad_dtype is not None, DUAL=False, BLOCK_P=MERGE_ROWS, BLOCK_C=32)
    return sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias


@torch.library.custom_op("fusedres_triton::batch_norm_backward_input", mutates_args=())
def batch_norm_backward_input(grad_out: torch.Tensor, output: Optional[torch.Tensor],
                              input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                              weight: Optional[torch.Tensor], sum_dy: torch.Tensor,
                              sum_dy_xhat: torch.Tensor, scale: Optional[torch.Tensor] = None,
                              shift: Optional[torch.Tensor] = None,
                              extra_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    check("batch_norm_backward_input", grad_out, output, input, mean, invstd, weight, sum_dy,
          sum_dy_xhat, scale, shift, extra_grad)
    dy, y, x = _prepare(grad_out, output, input)
    extra = match_layout(extra_grad, x)
    grad_input = torch.empty_like(x)
    if x.numel() == 0:
        return grad_input
    rows, C, inner = channel_view(x)
    (y, scale, shift), mask = _mask_args(y, scale, shift, dy)
    launch(
        _input_grad_kernel, tile_grid(rows, C), x.device,
        dy, y, x, grad_input, mean.contiguous(), invstd.contiguous(),
        weight.contiguous() if weight is not None else invstd, sum_dy.contiguous(),
        sum_dy_xhat.contiguous(), scale, shift, extra if extra is not None else dy,
        *(x, grad_input), *(invstd,) * 4, x.numel() // C, rows, C, inner, **mask,
        HAS_WEIGHT=weight is not None, HAS_EXTRA=extra is not None, DUAL=False,
        HAS_R_WEIGHT=False, ACC=tl_acc(x.dtype))
    return grad_input


@torch.library.custom_op("fusedres_triton::dual_batch_norm_backward", mutates_args=())
def dual_batch_norm_backward(grad_out: torch.Tensor, output: Optional[torch.Tensor],
                             input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                             weight: Optional[torch.Tensor], residual: torch.Tensor,
                             residual_mean: torch.Tensor, residual_invstd: torch.Tensor,
                             residual_weight: Optional[torch.Tensor],
                             grad_dtype: Optional[torch.dtype] = None,
                             residual_grad_dtype: Optional[torch.dtype] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """Both BNs of the dual form in three launches: one reduce over (grad_out, output, input,
    residual) for both BNs' sums, one merge for both, one pass writing both gradients."""
    check("dual_batch_norm_backward", grad_out, output, input, mean, invstd, weight, residual,
          residual_mean, residual_invstd, residual_weight, grad_dtype, residual_grad_dtype)
    dy, y, x = _prepare(grad_out, output, input)
    r = match_layout(residual, x)
    rows, C, inner = channel_view(x)
    acc = acc_dtype(x.dtype)
    grads = [torch.empty(C, dtype=dtype or acc, device=x.device)
             for dtype in (grad_dtype, grad_dtype, residual_grad_dtype, residual_grad_dtype)]
    grad_input, grad_residual = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return grad_input, grad_residual, *(g.zero_() for g in grads)
    sum_dy, sum_dy_xhat, sum_dy_rhat = (torch.empty(C, dtype=acc, device=x.device)
                                        for _ in range(3))
    programs, rows_per_program = row_split(rows, C, x.device)
    partials = torch.empty(3, programs, C, dtype=acc, device=x.device)
    (y, scale, shift), mask = _mask_args(y, None, None, dy)
    mean, invstd = mean.contiguous(), invstd.contiguous()
    r_mean, r_invstd = residual_mean.contiguous(), residual_invstd.contiguous()
    launch(_reduce_partial_kernel, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), programs),
           x.device, dy, y, x, mean, scale, shift, partials, dy, r, r_mean, rows, C, inner,
           rows_per_program, **mask, WRITE_GRAD=False, DUAL=True, ACC=tl_acc(x.dtype))
    launch(_reduce_merge_kernel, (triton.cdiv(C, 32),), x.device, partials, invstd, sum_dy,
           sum_dy_xhat, grads[0], grads[1], r_invstd, sum_dy_rhat, grads[2], grads[3], programs,
           C, ACC=tl_acc(x.dtype), GRADS=True, DUAL=True, BLOCK_P=MERGE_ROWS, BLOCK_C=32)
    launch(
        _input_grad_kernel, tile_grid(rows, C), x.device,
        dy, y, x, grad_input, mean, invstd, weight.contiguous() if weight is not None else invstd,
        sum_dy, sum_dy_xhat, scale, shift, dy, r, grad_residual, r_mean, r_invstd,
        residual_weight.contiguous() if residual_weight is not None else r_invstd, sum_dy_rhat,
        x.numel() // C, rows, C, inner, **mask, HAS_WEIGHT=weight is not None, HAS_EXTRA=False,
        DUAL=True, HAS_R_WEIGHT=residual_weight is not None, ACC=tl_acc(x.dtype))
    return grad_input, grad_residual, *grads
