"""Shared by the Triton kernels: the (outer, C, inner) view of a tensor, the per-channel dtype
(float32, or float64 for float64 inputs), and how every kernel is launched (`launch`): on the
tensors' device, with a grid CUDA accepts, and with a tuned or a fixed tile config.

Tile configs. Each autotuned kernel has a tuning space (`configs`), one fixed, known-good
config (`fixed_config`) and a small one for the interpreter (`interpreter_config`). On a GPU
the first call per (kernel, shapes) benchmarks the configs that fit the device; the result is
kept on disk (Triton's cache directory, TRITON_CACHE_DIR), so later processes and other DDP
ranks reuse it. FUSEDRES_TRITON_AUTOTUNE=0, or torch.use_deterministic_algorithms(True), uses
the fixed config instead (no tuning, and the same reduction order in every run and rank).
Tuning cannot run inside a CUDA graph capture: warm up (one call per shape) before capturing.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from fusedres._ops import accumulate_dtype as acc_dtype  # noqa: F401  (shared with the C++ side)

# The Triton interpreter runs the kernels on CPU tensors (slowly): for tests without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ROUND_BY_BITS = tl.constexpr(INTERPRETED)  # (a global a jit function reads: a constexpr)

# Tiles (rows x channels) of the BN kernels. The kernels write only their outputs, so
# autotuning may re-run a config freely.
BLOCK_ROWS = 32  # rows a reduction program's share is rounded to
TILE_CONFIGS = [
    triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
    for r, c, w in [(32, 64, 4), (64, 64, 4), (128, 32, 4), (16, 128, 4), (64, 128, 8),
                    (256, 8, 4), (32, 32, 2)]
]
TILE_FIXED = TILE_CONFIGS[0]
TILE_INTERPRETED = triton.Config({"BLOCK_R": 32, "BLOCK_C": 32})
TILE_KEY = ["C", "INNER"]

# CUDA's limits on the grid's x, y and z dimensions.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# GPU cost counting (fusedres._cost; tests and bench only). cost_counter: while a count is on,
# the counter every launch reports to (None otherwise: one comparison per launch).
# interpreted_sm_count: in the interpreter, size reduction grids and pick tile configs as on a
# GPU with that many SMs (fusedres._cost.gpu_geometry; None: the interpreter's small ones).
cost_counter = None
interpreted_sm_count = None


def autotuned(configs, key, fixed, interpreted, prune=None, restore=None):
    """triton.autotune over `configs`, results kept on disk; `prune(configs, named_args)`
    drops the configs that cannot run on the arguments' device; `restore`: the arguments a
    kernel changes in place beyond what it writes afresh (a counter), which the autotuner's
    trial runs must leave as they were."""
    def wrap(fn):
        kernel = triton.autotune(
            configs=configs, key=key, cache_results=True, restore_value=restore,
            prune_configs_by={"early_config_prune": prune} if prune is not None else None)(fn)
        kernel.fixed_config = fixed
        kernel.interpreter_config = interpreted
        return kernel
    return wrap


def autotuning() -> bool:
    """Whether launches tune their configs (on a GPU): FUSEDRES_TRITON_AUTOTUNE is not 0 and
    deterministic algorithms are off."""
    return (os.environ.get("FUSEDRES_TRITON_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


_forced: dict = {}  # kernel -> config: tests run each config of a kernel in turn


@contextlib.contextmanager
def forced_config(kernel, config):
    """Launches of `kernel` use `config` (any config, tuned or not) inside the block."""
    _forced[kernel] = config
    try:
        yield
    finally:
        del _forced[kernel]


def config_for(kernel):
    """The config a launch of `kernel` uses, or None to let the autotuner choose."""
    if kernel in _forced:
        return _forced[kernel]
    if not hasattr(kernel, "configs"):
        return None  # a plain kernel: its block sizes are arguments
    if INTERPRETED:
        return kernel.fixed_config if interpreted_sm_count else kernel.interpreter_config
    return None if autotuning() else kernel.fixed_config


def tuning_key(kernel, args, kwargs) -> tuple:
    """The autotuner's cache key for a call (as triton.runtime.Autotuner.run builds it)."""
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> dict:
    """Runs `kernel` over `grid` (a tuple, or a function of the launch's meta-parameters) on
    `device`, whatever device is current. Returns the meta-parameters of the launch that ran
    (its block sizes: the autotuner's best_config is shared by every thread and may have
    changed since)."""
    name = getattr(kernel, "fn", kernel).__name__
    launched = {}
    ran = []  # the grid of the launch that ran

    def checked_grid(meta):
        dims = tuple(grid(meta) if callable(grid) else grid)
        for axis, (size, limit) in enumerate(zip(dims, GRID_LIMITS)):
            if size > limit:
                raise RuntimeError(f"fusedres: {name}: {size} programs on grid axis {axis}, "
                                   f"over CUDA's limit of {limit}")
        launched.clear()
        launched.update(meta)
        ran[:] = [dims]
        return dims

    config = config_for(kernel)
    if (config is None and hasattr(kernel, "configs") and device.type == "cuda"
            and torch.cuda.is_current_stream_capturing() and len(kernel.configs) > 1
            and tuning_key(kernel, args, kwargs) not in kernel.cache):
        raise RuntimeError(
            f"fusedres: the Triton kernel {name} would autotune inside a CUDA graph capture, "
            "which cannot run it; run the model once with these shapes before capturing, or set "
            "FUSEDRES_TRITON_AUTOTUNE=0")
    counter = cost_counter
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if counter is None:
            _run(kernel, config, checked_grid, args, kwargs)
        else:
            with counter.triton_launch(kernel, args, kwargs, launched, ran):
                _run(kernel, config, checked_grid, args, kwargs)
    return launched


_autotuner_lock = threading.RLock()


def _run(kernel, config, grid, args, kwargs):
    """The launch itself: through the autotuner when config is None."""
    if config is None:
        # Triton's Autotuner keeps each call's arguments on itself (self.nargs) until the call
        # ends: two threads in it at once read each other's, or None.
        with _autotuner_lock:
            kernel[grid](*args, **kwargs)
    else:
        jit = kernel.fn if hasattr(kernel, "configs") else kernel
        jit[grid](*args, **kwargs, **config.all_kwargs())


@triton.jit
def inverse_std(var, eps_hi, eps_lo, ACC: tl.constexpr):
    """1 / sqrt(var + eps), eps = eps_hi + eps_lo (float_pair), square root and division
    IEEE-rounded as the CUDA kernels' (the BN coefficients of training and eval)."""
    var_eps = var + eps_hi + eps_lo
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var_eps)  # (IEEE-rounded in float64)
    else:
        invstd = tl.math.div_rn(tl.full(var.shape, 1.0, ACC), tl.sqrt_rn(var_eps))
    return invstd


def float_pair(value: float) -> tuple[float, float]:
    """(hi, lo), both float32 values, hi + lo == value to about 2**-48 of it. A Python float
    argument reaches a compiled Triton kernel as float32 (the interpreter keeps the double):
    a float64 kernel adds both halves to get the double back."""
    hi = float(np.float32(value))
    return (hi, float(np.float32(value - hi))) if math.isfinite(hi) else (hi, 0.0)


def fitting_configs(configs, element_size: int, shared_memory: int):
    """The matrix-product configs whose pipelined A and B tiles (num_stages buffers each) fit
    in `shared_memory` bytes."""
    return [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * element_size <= shared_memory]


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


def row_split(rows: int, channels: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) along the rows of a reduction: enough programs to fill
    the GPU, each walking many tiles (few partials to merge); a handful in the interpreter."""
    if device.type != "cuda":
        target = interpreted_sm_count * 4 if interpreted_sm_count else 4
    else:
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4
    programs = max(1, min(triton.cdiv(rows, BLOCK_ROWS),
                          triton.cdiv(target, triton.cdiv(channels, 64))))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), BLOCK_ROWS) * BLOCK_ROWS
    return triton.cdiv(rows, rows_per_program), rows_per_program


@triton.jit
def tile_offsets(rows, cols, C, INNER: tl.constexpr):
    """Memory offsets of a (rows, cols) tile of channel_view's (rows, C, INNER); rows and cols
    are int64 vectors, C may be an int32 scalar: every product has an int64 factor first (C *
    INNER alone wraps once a sample holds 2**31 values). INNER (H * W, or 1: channels_last) is
    a compile-time constant, so that the NCHW tile's division and remainder by it are a
    multiply-high and a shift, not a 64-bit division per row (a variant per H * W, as the
    autotuner keys on it anyway; untuned, a compile per new H * W)."""
    if INNER == 1:
        return rows[:, None] * C + cols[None, :]
    return (rows // INNER)[:, None] * C * INNER + (rows % INNER)[:, None] + cols[None, :] * INNER


@triton.jit
def tile_of_program(rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(row indices, channel indices) of this program's tile on a 1-D grid of
    cdiv(rows, BLOCK_R) * cdiv(C, BLOCK_C) programs, channel blocks fastest (a 2-D grid would
    cap the channel blocks at 65535)."""
    pid = tl.program_id(0).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    r = (pid // c_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, cols


def tile_grid(rows: int, C: int):
    """The grid of tile_of_program."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(C, meta["BLOCK_C"]),)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x (float32) in DTYPE, rounded to the nearest value, ties to even, as PyTorch rounds. A
    GPU's conversion does exactly that; the interpreter's bfloat16 conversion truncates, so
    there the rounding is done on the bits first (the conversion is then exact)."""
    if _ROUND_BY_BITS and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # (NaN stays NaN)
    return x.to(DTYPE)
