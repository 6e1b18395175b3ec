"""GPU cost of the fused BN ops, counted without a GPU (issue 16): kernel launches and global-
memory bytes per op on the `cuda` target (the CUDA kernels, in their emulation build) and the
`triton` target (the Triton kernels, in the interpreter), at ResNet-50's BN shapes (bfloat16,
channels_last, N=256, 224x224), next to eager PyTorch's launches, with an H100 estimate.

    python bench/count_cost.py            # all 16 BN shapes of ResNet-50 (about 10 minutes)
    python bench/count_cost.py --quick    # three shapes
    python bench/count_cost.py --out bench/results/RUN.md

What runs: each op as fusedres.nn runs it in a ResNet-50 training step (the functional op with
the BN's bfloat16 parameters and buffers, momentum 0.1, num_batches_tracked) and its backward
(autograd, gradients of the input, the residual and the BN parameters), and the eval form (the
converted model in eval mode; fusedres.freeze instead folds these BNs into the convolutions).
Eager: nn.BatchNorm2d, `out += identity`, nn.ReLU(inplace=True), as torchvision's blocks.

How it is counted (fusedres._cost, under gpu_geometry(132): grids sized for an H100's 132 SMs):
- kernels: each launch's distinct bytes read and written, exact (the emulation counts every
  global access of csrc/cuda, the interpreter every Triton load / store with its mask);
- ATen ops the ops' glue issues (running statistics, casts, zero-filled gradients, ...): one
  launch each, bytes estimated from their operands (each input read once, output written once);
- eager PyTorch: its ATen ops, one launch each (a lower bound: a BN on a GPU is 2-3 kernels).

Scaling to N=256 (the emulation and the interpreter are too slow for 256 x 64 x 112 x 112):
- cuda: counted at two batch sizes N1 and 2 * N1, N1 the first power of two at which every
  reduction's row blocks grow from N1 to 2 * N1. A launch's bytes are a + b * N (per-sample
  and per-channel bytes) but for a reduction's partials: k bytes per row block, written by the
  reduction and read by its merge, and the row blocks grow with N until each reduces enough
  rows (csrc/cuda/utils.cuh, min_partial_rows). So k is the merge's growth per row block, the
  row blocks at N=256 those of the launchers' rule (cuda_reduction_grid, a copy checked
  against every counted grid), and the rest is the line through the two counts. Checked by
  counting one shape at N=256 itself.
- triton: counted at one small N (about 2**18 values), then scaled per tensor argument: bytes of
  a tensor of the activation's size that a kernel reads or writes whole scale by 256 / N; the
  reductions' partials by the number of row programs at N=256 over those counted (the launcher's
  own row_split at N=256); everything else (per-channel vectors, the first row that shifts the
  statistics) is independent of N. ATen ops on an activation-sized operand scale by 256 / N.
  Checked on two shapes by counting at 2 * N as well and comparing with the prediction.

Estimate (labelled so everywhere): time = bytes / 2.8 TB/s + launches x 2.5 us, an H100 SXM's
bandwidth and a fixed cost per launch; no overlap, no L2 reuse between kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads
os.environ.setdefault("FUSEDRES_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

import fusedres  # noqa: E402
import fusedres.functional as FF  # noqa: E402
from fusedres import _cost  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.bfloat16
BATCH = 256
IMAGE = 224
BANDWIDTH = 2.8e12  # bytes / s, H100 SXM (HBM3)
LAUNCH_S = 2.5e-6  # per kernel launch
TARGETS = {"cuda": "cuda-emulated", "triton": "triton"}

# The BN ops of a ResNet-50 training step, in network order: (form, channels, side, count).
# relu: relu(bn(x)); add: relu(bn(x) + identity); dual: relu(bn(x) + bn_ds(z)), the block with
# a projection shortcut. 33 + 12 + 4 ops, 53 BN layers.
RESNET50 = [
    ("relu", 64, 112, 1),  # the stem
    ("relu", 64, 56, 6), ("dual", 256, 56, 1), ("add", 256, 56, 2),  # layer1
    ("relu", 128, 56, 1), ("relu", 128, 28, 7), ("dual", 512, 28, 1), ("add", 512, 28, 3),
    ("relu", 256, 28, 1), ("relu", 256, 14, 11), ("dual", 1024, 14, 1), ("add", 1024, 14, 5),
    ("relu", 512, 14, 1), ("relu", 512, 7, 5), ("dual", 2048, 7, 1), ("add", 2048, 7, 2),
]
QUICK = [("relu", 64, 56, 6), ("add", 256, 56, 2), ("dual", 256, 56, 1)]
LAYER1 = [(form, channels, side) for form, channels, side, _ in QUICK]  # the per-op table's
PHASES = ("fwd", "bwd", "eval")
# Full-tensor passes an op cannot do with fewer (issue 16): forward: stats read(s), one read
# per operand, one write; backward: the reduction's reads, then one read per operand and one
# write per gradient (the ReLU mask recomputed from x where there is no residual; with a
# residual the masked gradient is written once, which is also the residual's gradient). Eval:
# one read per operand, one write.
FLOOR = {"relu": {"fwd": 3, "bwd": 5, "eval": 2}, "add": {"fwd": 4, "bwd": 7, "eval": 3},
         "dual": {"fwd": 5, "bwd": 10, "eval": 3}}
GOAL_LAUNCHES = {"fwd": 3, "bwd": 3}
# ResNet-50 bfloat16 channels_last N=256 on an H100 (issue 16): torch.compile measured with
# torch 2.11, and the goals.
MEASURED_IMG_S = {"compile training": 5462, "compile inference": 22408, "goal training": 7000,
                  "goal inference": 30000}


# ---- the ops ---------------------------------------------------------------------------------


@dataclass
class Case:
    form: str
    x: torch.Tensor
    residual: torch.Tensor | None
    bns: list  # nn.BatchNorm2d, bfloat16: the op's BN and, for dual, the shortcut's
    grad: torch.Tensor

    @property
    def inputs(self) -> list:
        """What the backward differentiates: input, residual, each BN's weight and bias."""
        params = [p for bn in self.bns for p in (bn.weight, bn.bias)]
        return [self.x] + ([self.residual] if self.residual is not None else []) + params


def make_case(form: str, n: int, channels: int, side: int) -> Case:
    generator = torch.Generator().manual_seed(0)

    def activation():
        t = torch.randn(n, channels, side, side, generator=generator).to(DTYPE)
        return t.to(memory_format=torch.channels_last)

    bns = []
    for _ in range(2 if form == "dual" else 1):
        bn = torch.nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0, 0.1, generator=generator)
        bns.append(bn.to(DTYPE))
    x = activation().requires_grad_()
    residual = activation().requires_grad_() if form != "relu" else None
    return Case(form, x, residual, bns, activation())


def _bn_args(bn, training):
    return dict(running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight,
                bias=bn.bias, training=training, momentum=bn.momentum if training else 0.0,
                eps=bn.eps, num_batches_tracked=bn.num_batches_tracked if training else None)


def fused(case: Case, training: bool):
    """The op as fusedres.nn runs it (nn.py: conv_bn_act / conv_bn_add_act)."""
    a = _bn_args(case.bns[0], training)
    if case.form == "relu":
        return FF.batch_norm_relu(case.x, **a)
    if case.form == "add":
        return FF.batch_norm_add_relu(case.x, case.residual, **a)
    b = _bn_args(case.bns[1], training)
    return FF.dual_batch_norm_add_relu(
        case.x, case.residual, a["running_mean"], a["running_var"], b["running_mean"],
        b["running_var"], a["weight"], a["bias"], b["weight"], b["bias"], training,
        a["momentum"], a["eps"], residual_momentum=b["momentum"], residual_eps=b["eps"],
        num_batches_tracked=a["num_batches_tracked"],
        residual_num_batches_tracked=b["num_batches_tracked"])


def eager(case: Case, training: bool):
    """torchvision's Bottleneck: bn, (bn_ds on the shortcut,) out += identity, ReLU in place."""
    for bn in case.bns:
        bn.train(training)
    out = case.bns[0](case.x)
    if case.form == "add":
        out += case.residual
    elif case.form == "dual":
        out += case.bns[1](case.residual)
    return torch.nn.functional.relu(out, inplace=True)


def count_phases(run, case: Case) -> dict:
    """fwd, bwd (of that forward) and eval, each counted on its own."""
    with _cost.count() as fwd:
        out = run(case, True)
    with _cost.count() as bwd:
        torch.autograd.grad(out, case.inputs, case.grad)
    with torch.no_grad(), _cost.count() as ev:
        run(case, False)
    return {"fwd": fwd, "bwd": bwd, "eval": ev}


# ---- per phase: launches and bytes at N=256 ---------------------------------------------------


@dataclass
class Cost:
    """One op phase at N=256."""
    kernels: list  # fusedres kernel names
    aten: list  # ATen op names
    kernel_read: int  # bytes, exact (scaled)
    kernel_write: int
    aten_read: int  # bytes, estimated (scaled)
    aten_write: int
    per_kernel: list = field(default_factory=list)  # (name, grid, read, write) at N=256

    @property
    def launches(self) -> int:
        return len(self.kernels) + len(self.aten)

    @property
    def bytes(self) -> int:
        return self.kernel_read + self.kernel_write + self.aten_read + self.aten_write


def linear_at(v1: int, v2: int, n1: int, n2: int, n: int) -> int:
    value = Fraction(v1) + Fraction(v2 - v1, n2 - n1) * (n - n1)
    if value.denominator != 1 or value < 0:
        raise RuntimeError(f"counts {v1} at N={n1} and {v2} at N={n2} are not a + b * N")
    return int(value)


# csrc/cuda/utils.cuh: threads per block, blocks per SM the reductions aim for, and the
# partials' share of a reduction's bytes (kPartialShare).
CUDA_BLOCK_THREADS = 256
CUDA_BLOCKS_PER_SM = 8
CUDA_PARTIAL_SHARE = 64


def cuda_reduction_grid(rows: int, channels: int, partial_bytes: int, row_bytes: int,
                        sms: int = _cost.H100_SMS) -> tuple[int, int]:
    """(grid.x, grid.y) of channels_last_reduction_grid (csrc/cuda/utils.cuh) for a bfloat16
    reduction whose blocks write partial_bytes per channel and whose rows move row_bytes per
    channel; checked against every counted launch."""
    vectors = -(-channels // (16 // DTYPE.itemsize))
    target = sms * CUDA_BLOCKS_PER_SM
    min_rows = -(-CUDA_PARTIAL_SHARE * partial_bytes // row_bytes)
    max_gy = min(max(rows // min_rows, 1), 65535)
    bx = 1
    while bx < 32 and bx < vectors:
        bx *= 2
    while True:
        by = CUDA_BLOCK_THREADS // bx
        gx = -(-vectors // bx)
        gy = max(1, min(target // gx, -(-rows // by), max_gy))
        if bx <= 2 or gx * gy >= target // 2:
            return gx, gy
        bx //= 2


def cuda_reduction_rows(launch, form: str, partials: int) -> tuple[int, int]:
    """(partial bytes, row bytes) per channel by which a CUDA launcher sizes its reduction
    (min_partial_rows), from the partial bytes per channel and block row counted: the
    statistics count per tensor (the grid's z axis: the dual form's two), one bfloat16 read a
    row; the backward reduce both BNs' sums at once, reading dy and x (and z) a row."""
    if launch.kernel.startswith("stats_"):
        return partials // launch.grid[2], DTYPE.itemsize
    if launch.kernel.startswith("reduce_"):
        return partials, DTYPE.itemsize * (3 if form == "dual" else 2)
    raise RuntimeError(f"not a reduction: {launch.kernel}")


def reduction_of(c: _cost.Count) -> int | None:
    """The index of the phase's reduction launch (the one its merge follows), or None."""
    names = c.kernels()
    merges = [i for i, name in enumerate(names) if name == "merge_partials_kernel"]
    if len(merges) > 1 or merges == [0]:
        raise RuntimeError(f"unexpected launches {names}")
    return merges[0] - 1 if merges else None


def cuda_costs(form, channels, side) -> tuple[dict, int]:
    """The cuda target's phases at N=256 from counts at N1 and N2 = 2 * N1 (module docstring):
    each launch's bytes are a + b * N, but for the partials of a reduction (written by it,
    read by its merge), k bytes per block row times the row blocks, which grow with N."""
    fusedres.set_backend(TARGETS["cuda"])

    def row_blocks(phases, phase):
        i = reduction_of(phases[phase])
        return None if i is None else phases[phase].launches[i].grid[1]

    n = 1
    counted = {n: count_phases(fused, make_case(form, n, channels, side))}
    while True:  # the first N at which every reduction's row blocks grow from N to 2 * N
        counted[2 * n] = count_phases(fused, make_case(form, 2 * n, channels, side))
        if all(row_blocks(counted[n], p) != row_blocks(counted[2 * n], p)
               for p in PHASES if row_blocks(counted[n], p) is not None):
            break
        n *= 2
        if n >= BATCH:
            raise RuntimeError(f"{form} {channels}@{side}: no N with growing reductions")
    n1, n2 = n, 2 * n
    rows = {m: m * side * side for m in (n1, n2, BATCH)}
    result = {}
    for phase in PHASES:
        a, b = counted[n1][phase], counted[n2][phase]
        if a.kernels() != b.kernels():
            raise RuntimeError(f"{form} {channels}@{side} {phase}: launches differ between "
                               f"N={n1} and N={n2}: {a.kernels()} / {b.kernels()}")
        r = reduction_of(a)
        # partial bytes (subtracted before the line through the counts, added back at N=256)
        partial = {n1: [[0, 0] for _ in a.launches], n2: [[0, 0] for _ in a.launches],
                   BATCH: [[0, 0] for _ in a.launches]}
        grid256 = {}
        if r is not None:
            gy1, gy2 = a.launches[r].grid[1], b.launches[r].grid[1]
            k = Fraction(b.launches[r + 1].read_bytes - a.launches[r + 1].read_bytes, gy2 - gy1)
            if (k / channels).denominator != 1:
                raise RuntimeError(f"{form} {channels}@{side} {phase}: partials of {k} bytes "
                                   "a row block")
            partial_bytes, row_bytes = cuda_reduction_rows(a.launches[r], form, int(k / channels))
            rule = {m: cuda_reduction_grid(rows[m], channels, partial_bytes, row_bytes)
                    for m in rows}
            if (rule[n1], rule[n2]) != (a.launches[r].grid[:2], b.launches[r].grid[:2]):
                raise RuntimeError(f"{form} {channels}@{side} {phase}: grid rule {rule} against "
                                   f"the counted {a.launches[r].grid} / {b.launches[r].grid}")
            grid256[r] = rule[BATCH] + a.launches[r].grid[2:]
            for m in rows:
                blocks_k = int(k * rule[m][1])
                partial[m][r][1] = blocks_k  # written by the reduction
                partial[m][r + 1][0] = blocks_k  # read by its merge

        def at(la, lb, i, rw):  # a launch's bytes at N=256 (rw: 0 read, 1 written)
            v1, v2 = ((la.read_bytes, lb.read_bytes) if rw == 0 else
                      (la.write_bytes, lb.write_bytes))
            return (linear_at(v1 - partial[n1][i][rw], v2 - partial[n2][i][rw], n1, n2, BATCH)
                    + partial[BATCH][i][rw])

        per_kernel = [(la.kernel, grid256.get(i, lb.grid), at(la, lb, i, 0), at(la, lb, i, 1))
                      for i, (la, lb) in enumerate(zip(a.launches, b.launches))]

        def aten(f):
            return linear_at(f(a), f(b), n1, n2, BATCH)

        result[phase] = Cost(
            kernels=[launch.kernel for launch in a.launches], aten=[op.name for op in a.aten],
            kernel_read=sum(k[2] for k in per_kernel), kernel_write=sum(k[3] for k in per_kernel),
            aten_read=aten(lambda c: sum(op.read_bytes for op in c.aten)),
            aten_write=aten(lambda c: sum(op.write_bytes for op in c.aten)),
            per_kernel=per_kernel)
    return result, n1


def check_cuda_scaling(form, channels, side) -> str:
    """The cuda target's prediction for N=256 against a count at N=256 itself: exact."""
    predicted, n1 = cuda_costs(form, channels, side)
    measured = count_phases(fused, make_case(form, BATCH, channels, side))
    for phase in PHASES:
        c, p = measured[phase], predicted[phase]
        r = reduction_of(c)
        seen = [(la.kernel, la.grid if i == r else None, la.read_bytes, la.write_bytes)
                for i, la in enumerate(c.launches)]
        expected = [(k, grid if i == r else None, rb, wb)
                    for i, (k, grid, rb, wb) in enumerate(p.per_kernel)]
        if seen != expected:
            raise RuntimeError(f"cuda scaling check failed: {form} {channels}@{side} {phase}: "
                               f"{expected} != {seen}")
    blocks = [la.grid for la in measured["fwd"].launches[:1] + measured["bwd"].launches[:1]]
    return (f"{form} {channels}x{side}x{side} (cuda): N={n1} and N={2 * n1} scaled to N={BATCH} "
            f"equal the count at N={BATCH} in every launch, grid and byte (reduction grids "
            f"{blocks[0]} and {blocks[1]})")


def triton_programs(rows: int, channels: int) -> int:
    """Row programs of a Triton reduction (kernels._common.row_split, H100 geometry)."""
    from fusedres.kernels import _common

    with _cost.gpu_geometry():
        return _common.row_split(rows, channels, torch.device("cpu"))[0]


def scale_triton(c: _cost.Count, n: int, to: int, channels: int, side: int) -> Cost:
    """A Triton count at batch n, scaled to batch `to` per tensor argument (module docstring)."""
    activation = n * channels * side * side * DTYPE.itemsize
    programs_to = triton_programs(to * side * side, channels)
    read = write = 0
    per_kernel = []
    for launch in c.launches:
        kr = kw = 0
        for t in launch.tensors:
            if "(other)" in t["names"]:
                raise RuntimeError(f"{launch.kernel} touched memory outside its tensors")
            factor = Fraction(1)
            if t["nbytes"] == activation:
                whole = t["read_bytes"] in (0, activation) and t["write_bytes"] in (0, activation)
                factor = Fraction(to, n) if whole else Fraction(1)  # else: its first row
            elif "part_ptr" in t["names"]:
                factor = Fraction(programs_to, t["shape"][-2])  # [(2,) K, programs, C]
            kr += t["read_bytes"] * factor
            kw += t["write_bytes"] * factor
        if sum(t["read_bytes"] for t in launch.tensors) != launch.read_bytes:
            raise RuntimeError(f"{launch.kernel}: per-tensor bytes do not add up")
        per_kernel.append((launch.kernel, launch.grid, int(kr), int(kw)))
        read += kr
        write += kw
    aten_read = aten_write = 0
    elements = n * channels * side * side
    for op in c.aten:
        sizes = [math.prod(s) for s in op.shapes if isinstance(s, (list, tuple))]
        if sizes and max(sizes) == elements:
            factor = Fraction(to, n)
        elif not sizes or max(sizes) <= 16 * channels:
            factor = Fraction(1)
        else:
            raise RuntimeError(f"cannot scale {op.name} {op.shapes}")
        aten_read += op.read_bytes * factor
        aten_write += op.write_bytes * factor
    return Cost(kernels=[launch.kernel for launch in c.launches], aten=[op.name for op in c.aten],
                kernel_read=int(read), kernel_write=int(write), aten_read=int(aten_read),
                aten_write=int(aten_write), per_kernel=per_kernel)


def triton_batch(channels, side) -> int:
    return max(1, round(2**18 / (channels * side * side)))


def triton_costs(form, channels, side) -> tuple[dict, int]:
    fusedres.set_backend(TARGETS["triton"])
    n = triton_batch(channels, side)
    counted = count_phases(fused, make_case(form, n, channels, side))
    return {phase: scale_triton(counted[phase], n, BATCH, channels, side)
            for phase in PHASES}, n


def check_triton_scaling(form, channels, side) -> str:
    """Counts at N and 2N: the prediction for 2N from N must be exact."""
    fusedres.set_backend(TARGETS["triton"])
    n = triton_batch(channels, side)
    small = count_phases(fused, make_case(form, n, channels, side))
    big = count_phases(fused, make_case(form, 2 * n, channels, side))
    for phase in PHASES:
        predicted = scale_triton(small[phase], n, 2 * n, channels, side)
        measured = scale_triton(big[phase], 2 * n, 2 * n, channels, side)
        def seen(cost):  # (the tile grids differ: they follow the rows)
            return (cost.kernels, cost.aten, [(k, r, w) for k, _, r, w in cost.per_kernel],
                    cost.aten_read, cost.aten_write)

        if seen(predicted) != seen(measured):
            raise RuntimeError(f"Triton scaling check failed: {form} {channels}@{side} {phase}: "
                               f"{predicted} != {measured}")
    programs = (triton_programs(n * side * side, channels),
                triton_programs(2 * n * side * side, channels))
    return (f"{form} {channels}x{side}x{side}: N={n} scaled to N={2 * n} equals the count at "
            f"N={2 * n} in every launch and byte ({programs[0]} and {programs[1]} row programs)")


def eager_launches(form, channels, side) -> dict:
    """Eager's ATen ops per phase (counted at N=2; the count does not depend on N)."""
    case = make_case(form, 2, channels, side)
    return {phase: [op.name for op in c.aten] for phase, c in count_phases(eager, case).items()}


# ---- the report ------------------------------------------------------------------------------


def estimate_us(cost: Cost) -> float:
    return (cost.bytes / BANDWIDTH + cost.launches * LAUNCH_S) * 1e6


def passes(cost: Cost, channels, side) -> float:
    return cost.bytes / (BATCH * channels * side * side * DTYPE.itemsize)


def short(names: list) -> str:
    """kernel names with repeats folded: a, b x2, ..."""
    out = []
    for name in names:
        name = name.removeprefix("aten::")
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return ", ".join(n if k == 1 else f"{n} x{k}" for n, k in out)


def git_state() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip()
    dirty = [line[3:] for line in git("status", "--porcelain").splitlines()
             if line[3:].startswith(("kernels/", "csrc/", "fusedres/"))]
    return commit + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def report(results, eager, shapes, checks, counted_batches, seconds, state) -> str:
    lines = []
    add = lines.append
    today = datetime.date.today().isoformat()
    add(f"# GPU cost, counted without a GPU ({today})")
    add("")
    add(f"`python bench/count_cost.py` at {state or git_state()}; "
        f"{platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}, triton {_triton_version()}; {seconds / 60:.0f} min. "
        "ResNet-50's BN ops in bfloat16, channels_last, N=256, 224x224. What is counted and how "
        "the counts are scaled to N=256: bench/count_cost.py and fusedres/_cost.py. "
        "**Estimated H100 time** = bytes / 2.8 TB/s + launches x 2.5 us: an estimate, not a "
        "measurement (no GPU has run these kernels).")
    add("")
    add("Launches: fusedres kernels + ATen ops of the op's glue (each ATen op at least one "
        "launch on a GPU). Bytes: the kernels' distinct bytes (exact) + the ATen ops' (estimated "
        "from their operands). Passes: bytes / the activation's bytes (256 x C x H x W x 2).")
    add("")
    # per op form: layer1 shapes, and ranges over all shapes
    reference = {form: (channels, side) for form, channels, side in LAYER1
                 if (form, channels, side) in {(f, c, s) for f, c, s, _ in shapes}}
    add("## Per op (layer1 shapes; passes over all of ResNet-50's shapes of the op in brackets)")
    add("")
    add("| op | phase | target | launches: kernels + ATen = total [goal] | passes [all shapes] "
        "| floor | over floor | est. H100 us | eager launches (ATen ops) |")
    add("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for form in ("relu", "add", "dual"):
        if form not in reference:
            continue
        channels, side = reference[form]
        for phase in PHASES:
            for target in results:
                cost = results[target][(form, channels, side)][phase]
                spread = [passes(results[target][(f, c, s)][phase], c, s)
                          for f, c, s, _ in shapes if f == form]
                p = passes(cost, channels, side)
                floor = FLOOR[form][phase]
                goal = f" [{GOAL_LAUNCHES[phase]}]" if phase in GOAL_LAUNCHES else ""
                add(f"| {_label(form)} {channels}x{side}x{side} | {phase} | {target} | "
                    f"{len(cost.kernels)} + {len(cost.aten)} = {cost.launches}{goal} | "
                    f"{p:.2f} [{min(spread):.2f}-{max(spread):.2f}] | {floor} | "
                    f"{100 * (p / floor - 1):+.0f}% | {estimate_us(cost):.0f} | "
                    f"{len(eager[(form, channels, side)][phase])} |")
    add("")
    add("## Per step (the BN work of ResNet-50: 49 fused ops, 53 BN layers)")
    add("")
    add("| step | target | launches (eager's) | GB moved (floor) | est. H100 ms: bytes + "
        "launches = total |")
    add("|---|---|---:|---:|---:|")
    for step, phases in (("training (fwd + bwd)", ("fwd", "bwd")), ("inference (eval)", ("eval",))):
        eager_count = sum(len(eager[(f, c, s)][p]) * k for f, c, s, k in shapes for p in phases)
        for target in results:
            costs = [(results[target][(f, c, s)][p], k) for f, c, s, k in shapes for p in phases]
            launches = sum(cost.launches * k for cost, k in costs)
            moved = sum(cost.bytes * k for cost, k in costs)
            floor = sum(FLOOR[f][p] * BATCH * c * s * s * DTYPE.itemsize * k
                        for f, c, s, k in shapes for p in phases)
            t_bytes = moved / BANDWIDTH * 1e3
            t_launch = launches * LAUNCH_S * 1e3
            add(f"| {step} | {target} | {launches} ({eager_count}) | {moved / 1e9:.2f} "
                f"({floor / 1e9:.2f}) | {t_bytes:.2f} + {t_launch:.2f} = {t_bytes + t_launch:.2f} |")
    add("")
    per_step = {name: BATCH / rate * 1e3 for name, rate in MEASURED_IMG_S.items()}
    add("For scale, the whole network (convolutions included) as issue 16 measured it on an H100 "
        "with torch 2.11 (bfloat16, channels_last, N=256; no eager figure was given): "
        f"torch.compile trains at {MEASURED_IMG_S['compile training']:,} img/s, "
        f"{per_step['compile training']:.1f} ms a step, and infers at "
        f"{MEASURED_IMG_S['compile inference']:,} img/s, {per_step['compile inference']:.1f} ms; "
        f"the goals, {MEASURED_IMG_S['goal training']:,} and "
        f"{MEASURED_IMG_S['goal inference']:,} img/s, are {per_step['goal training']:.1f} and "
        f"{per_step['goal inference']:.1f} ms a step. The estimates above are the BN ops' share "
        "only.")
    add("")
    add("## What launches (layer1 shapes)")
    add("")
    add("| op | phase | target | kernels | ATen ops |")
    add("|---|---|---|---|---|")
    for form in ("relu", "add", "dual"):
        if form not in reference:
            continue
        key = (form, *reference[form])
        for phase in PHASES:
            for target in results:
                cost = results[target][key][phase]
                add(f"| {_label(form)} | {phase} | {target} | {short(cost.kernels)} | "
                    f"{short(cost.aten)} |")
            add(f"| {_label(form)} | {phase} | eager | | {short(eager[key][phase])} |")
    add("")
    add("## Every shape")
    add("")
    add("Counted at N (cuda: N1 and 2 x N1; triton: N) and scaled to N=256. MB = 1e6 bytes: "
        "kernels read / write, ATen ops (estimated) read + write.")
    add("")
    add("| op | C x H x W (in the step) | phase | target | N counted | launches | kernels MB r / w "
        "| ATen MB | passes | floor | est. H100 us |")
    add("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for form, channels, side, k in shapes:
        for phase in PHASES:
            for target in results:
                cost = results[target][(form, channels, side)][phase]
                n = counted_batches[target][(form, channels, side)]
                add(f"| {_label(form)} | {channels}x{side}x{side} (x{k}) | {phase} | {target} | "
                    f"{n} | {len(cost.kernels)} + {len(cost.aten)} | "
                    f"{cost.kernel_read / 1e6:.1f} / {cost.kernel_write / 1e6:.1f} | "
                    f"{(cost.aten_read + cost.aten_write) / 1e6:.1f} | "
                    f"{passes(cost, channels, side):.2f} | {FLOOR[form][phase]} | "
                    f"{estimate_us(cost):.0f} |")
    add("")
    add("## Kernels (layer1 shapes): grid as counted (cuda: N=256's; triton: the counted N's), "
        "MB read / written at N=256")
    add("")
    for form in ("relu", "add", "dual"):
        if form not in reference:
            continue
        key = (form, *reference[form])
        for target in results:
            for phase in PHASES:
                cells = "; ".join(f"{name} {tuple(grid)}: {r / 1e6:.2f} / {w / 1e6:.2f}"
                                  for name, grid, r, w in results[target][key][phase].per_kernel)
                add(f"- {_label(form)} {key[1]}x{key[2]}x{key[2]} {phase}, {target}: {cells}")
    add("")
    if checks:
        add("## Checks of the scaling")
        add("")
        for check in checks:
            add(f"- {check}")
        add("")
    return "\n".join(lines)


def _label(form: str) -> str:
    return {"relu": "BN+ReLU", "add": "BN+add+ReLU", "dual": "dual BN+add+ReLU"}[form]


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three shapes only")
    parser.add_argument("--targets", default="cuda,triton")
    parser.add_argument("--no-check", action="store_true", help="skip the Triton scaling check")
    parser.add_argument("--state", help="what was counted, for the report (default: the git "
                        "commit and the files changed since)")
    parser.add_argument("--out", default=str(
        ROOT / "bench" / "results" / f"{datetime.date.today()}_gpu-cost-counted.md"),
        help="the report (default: bench/results/<today>_gpu-cost-counted.md)")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else RESNET50
    targets = [t for t in args.targets.split(",") if t]
    for target in targets:
        why = fusedres._backend.unavailable_reason(TARGETS[target], "cpu")
        if why is not None:
            sys.exit(f"count_cost: target {target} unavailable: {why}")
    start = time.time()
    torch.manual_seed(0)
    results = {t: {} for t in targets}
    counted = {t: {} for t in targets}
    eager = {}
    checks = []
    with _cost.gpu_geometry(_cost.H100_SMS), contextlib.ExitStack():
        for form, channels, side, _ in shapes:
            key = (form, channels, side)
            eager[key] = eager_launches(form, channels, side)
            for target in targets:
                t0 = time.time()
                costs, n = (cuda_costs if target == "cuda" else triton_costs)(form, channels, side)
                results[target][key], counted[target][key] = costs, n
                print(f"{target:6} {form:4} {channels:4}x{side:3}: N={n:3} "
                      + "  ".join(f"{p} {c.launches} launches {passes(c, channels, side):.2f} "
                                  f"passes" for p, c in costs.items())
                      + f"  ({time.time() - t0:.0f} s)", flush=True)
        if "cuda" in targets and not args.no_check:
            checks.append(check_cuda_scaling("relu", 512, 7))
            print(checks[-1], flush=True)
        if "triton" in targets and not args.no_check:
            for form, channels, side in (("relu", 512, 7), ("dual", 1024, 14)):
                checks.append(check_triton_scaling(form, channels, side))
                print(checks[-1], flush=True)
    fusedres.set_backend("auto")
    text = report(results, eager, shapes, checks, counted, time.time() - start, args.state)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
