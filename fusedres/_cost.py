"""GPU cost, counted without a GPU (tests and benchmarks only): the kernel launches of the fused
ops and the global-memory bytes each kernel reads and writes.

    from fusedres import _cost
    with _cost.count() as c:        # everything run inside is counted
        out = fusedres.functional.batch_norm_relu(x, ..., training=True)
    c.launches      # the fusedres kernels, one Launch each (CUDA and Triton)
    c.aten          # the ATen ops the fused ops' glue issued (running statistics, casts, ...)
    c.total_launches, c.read_bytes, c.write_bytes

What is counted, and how exactly:

- CUDA kernels (csrc/cuda, run on CPU tensors by the `cuda-emulated` backend): every global-
  memory access goes through the load / store helpers of csrc/cuda/utils.cuh, which the
  emulation counts (csrc/emulation/cost.cpp). Exact: the bytes the load and store instructions
  move (`*_requests`), their number (`*_accesses`, `accesses_by_size`), and the distinct bytes
  each launch reads and writes (`read_bytes`, `write_bytes`: what DRAM must deliver when a
  launch's repeated reads, such as the per-channel parameters every thread reads, hit the
  cache). count(strict=True) also fails any launch that
  touches a tensor without the helpers (the tests run every kernel so), which proves that the
  count misses nothing.
- Triton kernels (kernels/, every launch through kernels._common.launch): under the
  interpreter (TRITON_INTERPRET=1) the interpreter's loads, stores and atomics are hooked for
  the count's duration: the elements each moves with its mask on (masked-off ones move
  nothing), and the distinct bytes. On a GPU the launches are counted, their bytes are not
  (None).
- ATen ops: torch.profiler records every ATen op run inside the count. Each that does work on
  the device (not an allocation, a view or a no-op cast, nor a fused op that launches the
  kernels above) counts as one launch: on a GPU it is at least one. Their bytes are an estimate
  from the operands' sizes (each input read once, the output written once). The copies the
  Triton interpreter makes of a kernel's arguments are excluded; so are the conversions of
  Python scalars inside an op (host work on a GPU). On CPU tensors an ATen op may be built from
  other ops than on a GPU; the batch-norm kernels of eager PyTorch (native_batch_norm and its
  backward) count as one launch each, a lower bound (two or more kernels on a GPU).

gpu_geometry() makes the emulation and the interpreter size their grids (and pick the tile
configs) as on an H100, so that the counted bytes of the reductions' partials are a GPU's.

Zero cost outside a count: the emulation pays one predictable branch per global-memory access,
the Triton launcher one comparison per launch, the CUDA build nothing.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import _extension

H100_SMS = 132  # streaming multiprocessors of an H100 SXM


@dataclass
class Launch:
    """One kernel launch of fusedres."""
    source: str  # "cuda" (csrc/cuda, emulated) or "triton"
    kernel: str
    grid: tuple
    block: Optional[tuple]  # threads per block (CUDA); None for Triton
    read_bytes: Optional[int]  # distinct bytes read (None: not counted, a Triton kernel on a GPU)
    write_bytes: Optional[int]  # distinct bytes written
    read_requests: Optional[int]  # bytes the load instructions move
    write_requests: Optional[int]  # bytes the store instructions move
    # Emulated CUDA: the load and store instructions (a 16-byte vector is one); else None.
    read_accesses: Optional[int] = None
    write_accesses: Optional[int] = None
    accesses_by_size: Optional[dict] = None  # bytes (1, 2, 4, 8, 16) -> loads and stores
    meta: dict = field(default_factory=dict)  # Triton: the launch's meta-parameters
    # Interpreted Triton: the distinct bytes per tensor argument, one dict each: names (the
    # kernel's arguments that are this tensor), shape, nbytes, read_bytes, write_bytes.
    tensors: list = field(default_factory=list)


@dataclass
class AtenOp:
    """An ATen op that does work on the device: at least one kernel launch on a GPU."""
    name: str
    shapes: list
    dtypes: list
    read_bytes: int  # estimate: each tensor input read once
    write_bytes: int  # estimate: the output (or the updated input) written once


@dataclass
class Count:
    """What ran inside one count()."""
    launches: list = field(default_factory=list)  # Launch, in launch order
    aten: list = field(default_factory=list)  # AtenOp, in call order

    @property
    def total_launches(self) -> int:
        return len(self.launches) + len(self.aten)

    @property
    def kernel_read_bytes(self) -> int:
        return sum(launch.read_bytes or 0 for launch in self.launches)

    @property
    def kernel_write_bytes(self) -> int:
        return sum(launch.write_bytes or 0 for launch in self.launches)

    @property
    def read_bytes(self) -> int:
        """Kernels' distinct bytes read (exact) plus the ATen ops' (estimated)."""
        return self.kernel_read_bytes + sum(op.read_bytes for op in self.aten)

    @property
    def write_bytes(self) -> int:
        return self.kernel_write_bytes + sum(op.write_bytes for op in self.aten)

    def kernels(self) -> list:
        """Names of the launches, fusedres kernels and ATen ops in their own order."""
        return [launch.kernel for launch in self.launches] + [op.name for op in self.aten]


# ---- the Triton kernels ----------------------------------------------------------------------


class _TritonRecord:
    """The memory accesses of one interpreted launch."""

    def __init__(self):
        self.requests = [0, 0]  # bytes read, written
        self.addresses = ([], [])  # per access: (element addresses with the mask on, itemsize)

    def add(self, write: bool, ptrs, mask, itemsize: int):
        addresses = ptrs.data
        if mask is not None:
            on = mask.data
            if on.shape != addresses.shape:
                on = np.broadcast_to(on, addresses.shape)
            addresses = addresses[on]
        addresses = np.asarray(addresses, dtype=np.uint64).ravel()
        self.requests[write] += addresses.size * itemsize
        self.addresses[write].append((addresses, itemsize))

    def distinct(self, write: bool):
        """The distinct byte addresses touched (each access's elements expanded to bytes)."""
        chunks = [(a[:, None] + np.arange(size, dtype=np.uint64)[None, :]).ravel() if size > 1
                  else a for a, size in self.addresses[write] if a.size]
        return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.uint64)


def _tensor_arguments(kernel, args, kwargs) -> list:
    """[names, shape, start address, extent in bytes] of each tensor a launch is given (an
    absent pointer's stand-in is another argument's tensor: one entry, both names)."""
    names = list(getattr(kernel, "arg_names", []))
    named = list(zip(names, args)) + list(kwargs.items())
    found = {}
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            continue
        extent = (sum((n - 1) * st for n, st in zip(value.shape, value.stride())) + 1
                  if value.numel() else 0) * value.element_size()
        key = (value.data_ptr(), extent)
        if key in found:
            found[key][0].append(name)
        else:
            found[key] = [[name], tuple(value.shape), value.data_ptr(), extent]
    return sorted(found.values(), key=lambda t: t[2])


def _per_tensor(tensors: list, read, written) -> list:
    """The distinct bytes read and written of each tensor argument; bytes outside them under
    the name "(other)". (Tensors are assumed not to overlap, as no kernel here is given two
    views of one buffer.)"""
    starts = np.array([t[2] for t in tensors], dtype=np.uint64)
    ends = np.array([t[2] + t[3] for t in tensors], dtype=np.uint64)
    result = [{"names": t[0], "shape": t[1], "nbytes": t[3], "read_bytes": 0, "write_bytes": 0}
              for t in tensors]
    other = {"names": ["(other)"], "shape": (), "nbytes": 0, "read_bytes": 0, "write_bytes": 0}
    for key, addresses in (("read_bytes", read), ("write_bytes", written)):
        if not addresses.size:
            continue
        index = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
        inside = index >= 0
        inside[inside] = addresses[inside] < ends[index[inside]]
        for i, n in enumerate(np.bincount(index[inside], minlength=len(tensors))):
            result[i][key] = int(n)
        other[key] = int(addresses.size - inside.sum())
    return result + ([other] if other["read_bytes"] or other["write_bytes"] else [])


class _TritonCounter:
    """kernels._common.cost_counter while a count is on: each launch reports here."""

    def __init__(self, count: Count, interpreted: bool, profiling: bool):
        self.count = count
        self.interpreted = interpreted
        self.profiling = profiling
        self.current: Optional[_TritonRecord] = None

    @contextlib.contextmanager
    def triton_launch(self, kernel, args, kwargs, meta: dict, grid: list):
        """Around one launch (kernels._common.launch): meta and grid are filled in by then."""
        name = getattr(kernel, "fn", kernel).__name__
        record = _TritonRecord() if self.interpreted else None
        self.current = record
        # The interpreter's own copies of the arguments are ATen ops: not the op's launches.
        scope = (torch.profiler.record_function(_KERNEL_SCOPE) if self.profiling
                 else contextlib.nullcontext())
        try:
            with scope:
                yield
        finally:
            self.current = None
        launch = Launch(
            source="triton", kernel=name, grid=tuple(grid[0]) if grid else (), block=None,
            read_bytes=None, write_bytes=None, read_requests=None, write_requests=None,
            meta={k: v for k, v in meta.items() if isinstance(v, (int, float, bool, str))})
        if record is not None:
            read, written = record.distinct(False), record.distinct(True)
            launch.read_bytes, launch.write_bytes = int(read.size), int(written.size)
            launch.read_requests, launch.write_requests = record.requests
            launch.tensors = _per_tensor(_tensor_arguments(kernel, args, kwargs), read, written)
        self.count.launches.append(launch)


@contextlib.contextmanager
def _interpreter_hooks(counter: _TritonCounter):
    """Hooks the interpreter's memory operations (all tl.load / tl.store / atomics end there,
    block and descriptor forms included) for the duration."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    cls = type(builder)

    def itemsize(ptrs):
        return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

    def masked_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        if counter.current is not None:
            counter.current.add(False, ptrs, mask, itemsize(ptrs))
        return cls.create_masked_load(builder, ptrs, mask, other, cache_modifier,
                                      eviction_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_modifier, eviction_policy):
        if counter.current is not None:
            counter.current.add(True, ptrs, mask, itemsize(ptrs))
        return cls.create_masked_store(builder, ptrs, value, mask, cache_modifier,
                                       eviction_policy)

    def atomic_rmw(rmw_op, ptr, val, mask, sem, scope):
        if counter.current is not None:
            for write in (False, True):
                counter.current.add(write, ptr, mask, itemsize(ptr))
        return cls.create_atomic_rmw(builder, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(ptr, cmp, val, sem, scope):
        if counter.current is not None:
            for write in (False, True):
                counter.current.add(write, ptr, None, itemsize(ptr))
        return cls.create_atomic_cas(builder, ptr, cmp, val, sem, scope)

    hooks = {"create_masked_load": masked_load, "create_masked_store": masked_store,
             "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}
    for name, hook in hooks.items():
        setattr(builder, name, hook)  # the instance's attribute, before the class's method
    try:
        yield
    finally:
        for name in hooks:
            builder.__dict__.pop(name, None)


def _triton_common():
    """kernels._common if the Triton kernels loaded, else None."""
    if not _extension.triton_loaded:
        return None
    from .kernels import _common

    return _common


def _emulation():
    """fusedres._C_emulated if it loads, else None."""
    if _extension.load_emulation() is not None:
        return None
    return sys.modules["fusedres._C_emulated"]


# ---- ATen ops --------------------------------------------------------------------------------

_KERNEL_SCOPE = "fusedres::triton_kernel"  # the profiler range around a Triton launch

# ATen ops that do no device work themselves (allocation, views, metadata; a cast or copy that
# copies shows its copy_ underneath).
_NO_WORK = frozenset("""
    empty empty_like empty_strided new_empty new_empty_strided view _unsafe_view reshape
    _reshape_alias as_strided expand expand_as detach detach_ alias lift lift_fresh t transpose
    permute squeeze unsqueeze select slice narrow contiguous to _to_copy clone resize_ set_
    resolve_conj resolve_neg view_as flatten unflatten split chunk unbind result_type size
    stride numel dim is_nonzero _has_compatible_shallow_copy_type record_stream _unsafe_index
    """.split())
# ATen ops counted as one launch whatever they call inside: the CPU implementation of a fused
# kernel of eager PyTorch builds it from other ops (zero_ fills) that a GPU does not launch.
_WHOLE_KERNELS = frozenset("""
    native_batch_norm native_batch_norm_backward _native_batch_norm_legit
    _native_batch_norm_legit_no_training _native_batch_norm_legit_functional
    _batch_norm_with_update _batch_norm_no_update batch_norm_backward cudnn_batch_norm
    cudnn_batch_norm_backward miopen_batch_norm miopen_batch_norm_backward
    """.split())
_ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
             "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1,
             "c10::complex<float>": 8, "c10::complex<double>": 16}


def _aten_op(event) -> AtenOp:
    name = event.name.removeprefix("aten::")
    shapes = list(event.input_shapes or [])
    dtypes = list(getattr(event, "input_dtypes", None) or [])
    tensors = [(math.prod(s), _ITEMSIZE[d]) for s, d in zip(shapes, dtypes)
               if d in _ITEMSIZE and isinstance(s, (list, tuple))]
    nbytes = [n * size for n, size in tensors]
    if name == "copy_":
        read, write = nbytes[1:2], nbytes[:1]
    elif name in ("fill_", "zero_"):
        read, write = [], nbytes[:1]
    elif name.endswith("_"):  # in place: the first operand is updated
        read, write = nbytes, nbytes[:1]
    else:  # the output: the largest operand's size, in the first operand's dtype
        read = nbytes
        write = [max(n for n, _ in tensors) * tensors[0][1]] if tensors else []
    return AtenOp(event.name, shapes, dtypes, sum(read), sum(write))


def _scalar_plumbing(event) -> bool:
    """A cast of 0-dim operands inside another ATen op: a Python scalar made a tensor (host
    work on a GPU), not a device op."""
    shapes = [s for s, d in zip(event.input_shapes or [], getattr(event, "input_dtypes", None)
                                or []) if d in _ITEMSIZE]
    return bool(shapes) and all(len(s) == 0 for s in shapes)


def aten_launches(events) -> list:
    """The ATen ops among profiler events that launch device work, in call order."""
    found = []

    def visit(event, inside_aten: bool) -> int:
        if event.name == _KERNEL_SCOPE:
            return 0  # a Triton kernel, counted by its launch; inside, the interpreter's copies
        is_aten = event.name.startswith("aten::")
        name = event.name.removeprefix("aten::")
        # (a _foreach_ op: one multi-tensor launch on a GPU for tensors of one dtype and device;
        # on the CPU it loops over per-tensor ops)
        if is_aten and (name in _WHOLE_KERNELS or name.startswith("_foreach_")):
            found.append((event.time_range.start, _aten_op(event)))
            return 1
        below = sum(visit(child, inside_aten or is_aten) for child in event.cpu_children)
        if below or not is_aten or name in _NO_WORK:
            return below
        if inside_aten and _scalar_plumbing(event):
            return 0
        found.append((event.time_range.start, _aten_op(event)))
        return 1

    for event in events:
        if event.cpu_parent is None:
            visit(event, False)
    return [op for _, op in sorted(found, key=lambda item: item[0])]


# ---- the counters ------------------------------------------------------------------------------


_active = False


@contextlib.contextmanager
def count(aten: bool = True, strict: bool = False):
    """Counts the launches and bytes of everything run inside (see the module's docstring).
    aten=False: the fusedres kernels only (no profiler). strict=True: also fail any emulated
    launch that touches a tensor without the counted helpers (the tensors must have been
    allocated under guard_allocations(True), as the tests' `use()` does). Counts do not nest."""
    global _active
    if _active:
        raise RuntimeError("fusedres._cost.count() does not nest")
    result = Count()
    emulation = _emulation()
    common = _triton_common()
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                       record_shapes=True) if aten else None)
    counter = _TritonCounter(result, bool(common and common.INTERPRETED), aten)
    with contextlib.ExitStack() as stack:
        _active = True
        stack.callback(globals().__setitem__, "_active", False)
        if emulation is not None:
            emulation.cost_start(strict)
            stack.callback(lambda: result.launches.extend(
                _cuda_launch(record) for record in emulation.cost_stop()))
        if common is not None:
            common.cost_counter = counter
            stack.callback(setattr, common, "cost_counter", None)
            if common.INTERPRETED:
                stack.enter_context(_interpreter_hooks(counter))
        if profiler is not None:
            stack.enter_context(profiler)
        yield result
    if profiler is not None:
        result.aten = aten_launches(profiler.events())
    # One order for both sources would need a shared clock; CUDA first, then Triton, each in
    # launch order (a count usually runs one backend).
    result.launches.sort(key=lambda launch: launch.source != "cuda")


def _cuda_launch(record: dict) -> Launch:
    return Launch(source="cuda", kernel=record["kernel"], grid=record["grid"],
                  block=record["block"], read_bytes=record["read_bytes"],
                  write_bytes=record["write_bytes"], read_requests=record["read_requests"],
                  write_requests=record["write_requests"],
                  read_accesses=record["read_accesses"], write_accesses=record["write_accesses"],
                  accesses_by_size=dict(zip((1, 2, 4, 8, 16), record["accesses_by_size"])),
                  meta={"shared_bytes": record["shared_bytes"]})


_geometry = None  # the SM count of the innermost gpu_geometry()


@contextlib.contextmanager
def gpu_geometry(sm_count: int = H100_SMS):
    """Inside: the emulated CUDA launchers size their grids for a GPU of `sm_count` SMs, and the
    interpreted Triton launchers their reduction grids and tile configs (the fixed configs, as
    on a GPU with FUSEDRES_TRITON_AUTOTUNE=0), so that counts are those of that GPU."""
    global _geometry
    emulation = _emulation()
    common = _triton_common()
    previous, _geometry = _geometry, sm_count
    if emulation is not None:
        emulation.set_emulated_sms(sm_count)
    if common is not None:
        common.interpreted_sm_count = sm_count
    try:
        yield
    finally:
        _geometry = previous  # (nested: the outer one's again; 0 / None: the defaults)
        if emulation is not None:
            emulation.set_emulated_sms(previous or 0)
        if common is not None:
            common.interpreted_sm_count = previous
