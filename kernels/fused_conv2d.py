"""Triton: implicit-GEMM 2-D convolution with a fused prologue and epilogue.

    out = act(conv(prologue(input), weight) + bias + residual)
    prologue(x) = relu?(x * input_scale[c] + input_shift[c])   (the previous BN, applied while
                                                                loading; zero padding stays 0)
and optionally the per-channel moments of `out` (the statistics of the BN that follows),
merged like batch_norm_stats, so no separate statistics pass is needed.

GEMM view: M = N * P * Q output pixels, N = C_out / groups per group, K = kh * kw * C_in /
groups. Each program computes a (BLOCK_M, BLOCK_N) tile of one group, walking the filter
taps and BLOCK_K input channels at a time; any memory layout works through strides, and
channels_last (NHWC) makes the K loads contiguous. Accumulation is float32 (float32 inputs
multiply in IEEE float32, not TF32).

Backward: the data and weight gradients come from ATen's convolution_backward on the
prologue's output, recomputed from the saved input (never stored by the forward); see
fusedres/_ops.py.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from fusedres._ops import check, conv_output_format, match_layout
from fusedres.reference import conv_output_shape

from ._common import autotuned, config_for, fitting_configs, launch
from .batch_norm_stats import merge_stats

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
        (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 2, 5),
    ]
]
FIXED = CONFIGS[1]  # 48 KB of shared memory in 16-bit, 96 KB in float32
INTERPRETED_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})


def _prune(configs, named_args, **kwargs):
    """The configs whose pipelined tiles fit the device's shared memory (the fixed one if none
    does)."""
    x = named_args["x_ptr"]
    props = torch.cuda.get_device_properties(x.device)
    limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return fitting_configs(configs, x.element_size(), limit) or [FIXED]


# The kernel writes only its outputs, so autotuning may re-run it freely; configs are cached
# per problem shape.
@autotuned(CONFIGS, ["C_in_g", "C_out_g", "KH", "KW", "P", "Q", "STRIDED", "HAS_PROLOGUE"], FIXED,
           INTERPRETED_CONFIG, prune=_prune)
@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, part_ptr, part_rows,
    M, H, W, P, Q, C_in_g, C_out_g, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swo, swc, swr, sws, syn, syc, syp, syq, srn, src, srp, srq,
    STRIDED: tl.constexpr, HAS_PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    EMIT_STATS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    image = m // (P * Q)
    p = (m % (P * Q)) // Q
    q = m % Q
    n_in_group = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n_in_group < C_out_g
    c_out = group * C_out_g + n_in_group

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(0, KH):
        h = p * stride_h - pad_h + r * dil_h
        for s in range(0, KW):
            w_col = q * stride_w - pad_w + s * dil_w
            pixel_ok = m_ok & (h >= 0) & (h < H) & (w_col >= 0) & (w_col < W)
            x_row = x_ptr + image * sxn + h * sxh + w_col * sxw
            for k0 in range(0, C_in_g, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < C_in_g
                c_in = group * C_in_g + k
                a_ok = pixel_ok[:, None] & k_ok[None, :]
                a = tl.load(x_row[:, None] + c_in[None, :] * sxc, mask=a_ok, other=0.0)
                if HAS_PROLOGUE:
                    scale = tl.load(scale_ptr + c_in, mask=k_ok, other=0.0)
                    shift = tl.load(shift_ptr + c_in, mask=k_ok, other=0.0)
                    a_f = a.to(tl.float32) * scale[None, :] + shift[None, :]
                    if PROLOGUE_RELU:
                        a_f = tl.where(a_f < 0.0, 0.0, a_f)  # keeps NaN (tl.maximum would not)
                    a = tl.where(a_ok, a_f, 0.0).to(x_ptr.dtype.element_ty)  # padding stays 0
                b = tl.load(w_ptr + c_out[None, :] * swo + k[:, None] * swc + r * swr + s * sws,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.dot(a, b)

    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_off = image[:, None] * srn + c_out[None, :] * src + p[:, None] * srp + q[:, None] * srq
        acc += tl.load(res_ptr + r_off, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN
    out = acc.to(y_ptr.dtype.element_ty)
    y_off = image[:, None] * syn + c_out[None, :] * syc + p[:, None] * syp + q[:, None] * syq
    tl.store(y_ptr + y_off, out, mask=ok)

    if EMIT_STATS:
        # Exact two-pass moments of this tile's stored values, per channel, taken about the
        # tile's first row (a finite value): the offsets from it are small and exact where a
        # large mean makes the values close, so no digits of the variance are lost. The
        # (count, mean, M2) partials are float64 (the tile's mean = first + mean offset, kept
        # whole), in batch_norm_stats' layout [3][part_rows][C_out], row pid_m.
        v = tl.where(ok, out.to(tl.float32), 0.0)
        first = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], v, 0.0), axis=0)
        first = tl.where(tl.abs(first) < float("inf"), first, 0.0)
        count = tl.sum(m_ok.to(tl.float32), axis=0)
        offset = tl.where(ok, v - first[None, :], 0.0)
        offset_mean = tl.sum(offset, axis=0) / count
        d = tl.where(ok, offset - offset_mean[None, :], 0.0)
        C_out = tl.num_programs(2).to(tl.int64) * C_out_g
        part = part_ptr + pid_m * C_out + c_out
        tl.store(part, tl.zeros([BLOCK_N], tl.float64) + count.to(tl.float64), mask=n_ok)
        tl.store(part + part_rows * C_out, first.to(tl.float64) + offset_mean.to(tl.float64),
                 mask=n_ok)
        tl.store(part + 2 * part_rows * C_out, tl.sum(d * d, axis=0).to(tl.float64), mask=n_ok)


@torch.library.custom_op("fusedres_triton::fused_conv2d", mutates_args=())
def fused_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], input_scale: Optional[torch.Tensor],
                 input_shift: Optional[torch.Tensor], stride: List[int], padding: List[int],
                 dilation: List[int], groups: int, input_relu: bool, relu: bool,
                 emit_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var): the fused convolution and, with emit_stats, the per-channel mean and
    biased variance of out (float32; empty tensors without emit_stats)."""
    check("fused_conv2d", input, weight, bias, residual, input_scale, input_shift, stride, padding,
          dilation, groups, input_relu, relu, emit_stats)
    N, C_in, H, W = input.shape
    C_out, C_in_g, KH, KW = weight.shape
    P, Q = conv_output_shape(input, weight, stride, padding, dilation)[2:]
    fmt = conv_output_format(input)
    x = input.contiguous(memory_format=fmt)
    # The tiles read the weight in the input's layout (a copy only for a mixed pair; on the
    # CPU path the C++ ops pass it as it is, but here the loads' order is the GPU's speed).
    w = weight.contiguous(memory_format=fmt)
    out = torch.empty((N, C_out, P, Q), dtype=input.dtype, device=input.device, memory_format=fmt)
    mean = torch.zeros(C_out if emit_stats else 0, dtype=torch.float32, device=input.device)
    var = torch.zeros_like(mean)
    M = N * P * Q
    if M == 0:
        return out, mean, var
    res = match_layout(residual, out)
    prologue = input_scale is not None
    dummy = out  # stands in for absent pointers; never read
    # One partial row per M tile: sized for the config that will run or, when the autotuner
    # chooses, the smallest tile height it may try.
    config = config_for(_conv2d_kernel)
    configs = [config] if config is not None else _conv2d_kernel.configs
    part_rows = triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in configs))
    partials = (torch.empty(3, part_rows, C_out, dtype=torch.float64, device=input.device)
                if emit_stats else dummy)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_out // groups, meta["BLOCK_N"]),
                groups)

    def per_channel(t):  # the kernel reads C float32 values in a row
        return t.to(torch.float32).contiguous()

    launched = launch(
        _conv2d_kernel, grid, input.device,
        x, w, out, per_channel(bias) if bias is not None else dummy,
        res if res is not None else dummy,
        per_channel(input_scale) if prologue else dummy,
        per_channel(input_shift) if prologue else dummy,
        partials, part_rows, M, H, W, P, Q, C_in_g, C_out // groups, KH, KW,
        *stride, *padding, *dilation, *x.stride(), *w.stride(), *out.stride(),
        *(res.stride() if res is not None else out.stride()),
        STRIDED=stride[0] > 1, HAS_PROLOGUE=prologue, PROLOGUE_RELU=input_relu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=res is not None, RELU=relu,
        EMIT_STATS=emit_stats, IEEE=input.dtype == torch.float32)
    if emit_stats:
        # Only the rows of the tile height that ran hold partials (autotuning may have tried
        # others and left stale rows behind them); that height is the launch's own.
        tiles = triton.cdiv(M, launched["BLOCK_M"])
        merge_stats(partials, tiles, None, 1, out=(mean, var))
    return out, mean, var
