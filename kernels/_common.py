"""Shared by the Triton kernels: the (outer, C, inner) view of a tensor, launch sizes, and
the per-channel dtype (float32, or float64 for float64 inputs)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fusedres._ops import accumulate_dtype as acc_dtype  # noqa: F401  (shared with the C++ side)
from fusedres._ops import is_channels_last

# The Triton interpreter runs the kernels on CPU tensors (slowly): for tests without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile (rows x channels) of the BN kernels: tuned on the GPU (kernels write only their
# outputs, so re-running a config is harmless), one fixed tile in the interpreter.
BLOCK_ROWS = 32  # rows a reduction program's share is rounded to
TILE_CONFIGS = (
    [triton.Config({"BLOCK_R": 32, "BLOCK_C": 32})]
    if INTERPRETED
    else [
        triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
        for r, c, w in [(32, 64, 4), (64, 64, 4), (128, 32, 4), (16, 128, 4), (64, 128, 8),
                        (256, 8, 4), (32, 32, 2)]
    ]
)
TILE_KEY = ["C", "inner"]


def dense(t: torch.Tensor) -> torch.Tensor:
    """NCHW-contiguous or channels_last as given; anything else copied to NCHW."""
    return t if t.is_contiguous() or is_channels_last(t) else t.contiguous()


def match_layout(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """t in the memory layout of like (same shape), copying only if needed."""
    if t is None:
        return None
    if like.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def channel_view(t: torch.Tensor) -> tuple[int, int, int]:
    """(rows, C, inner) of a dense tensor: element (row, c) lives at
    (row // inner) * C * inner + row % inner + c * inner. NCHW: inner = H*W; channels_last:
    inner = 1 (rows are pixels)."""
    n, c = t.shape[0], t.shape[1]
    spatial = t.numel() // (n * c) if n * c else 0
    if t.is_contiguous():
        return n * spatial, c, spatial
    return n * spatial, c, 1


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_split(rows: int, channels: int) -> tuple[int, int]:
    """(programs, rows_per_program) along the rows of a reduction: enough programs to fill
    the GPU, each walking many tiles (few partials to merge); a handful in the interpreter."""
    if INTERPRETED or not torch.cuda.is_available():
        target = 4
    else:
        target = torch.cuda.get_device_properties().multi_processor_count * 4
    programs = max(1, min(triton.cdiv(rows, BLOCK_ROWS),
                          triton.cdiv(target, triton.cdiv(channels, 64))))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), BLOCK_ROWS) * BLOCK_ROWS
    return triton.cdiv(rows, rows_per_program), rows_per_program


@triton.jit
def tile_offsets(rows, cols, C, inner, CHANNELS_LAST: tl.constexpr):
    """Memory offsets of a (rows, cols) tile; rows and cols are int64 vectors. C and inner
    may be int32 scalars: every product has an int64 factor first (C * inner alone wraps
    once a sample holds 2**31 values)."""
    if CHANNELS_LAST:
        return rows[:, None] * C + cols[None, :]
    return (rows // inner)[:, None] * C * inner + (rows % inner)[:, None] + cols[None, :] * inner
