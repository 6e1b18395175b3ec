"""NCHW access widths of the CUDA kernels, counted without a GPU (issue 16): the share of the
activation values each channels-first kernel moves in 16-byte accesses, at ResNet-50's BN shapes
in NCHW (contiguous) bfloat16, in the emulation build (fusedres._cost's `accesses_by_size`).

    python bench/count_nchw.py                    # prints the table (about a minute)
    python bench/count_nchw.py --out bench/results/RUN.md

A 16-byte access moves 8 bfloat16 values. A channels-first kernel walks the (sample, channel)
planes of H * W values (csrc/cuda/utils.cuh, PlaneUnits): a plane's whole aligned vectors take
one access each, the values at its clipped ends one each (2-byte accesses; the BN parameters are
float32 here, so their per-channel reads are 4-byte ones, left out). Counted at N = 2: the
planes' alignment repeats every 8 planes and C is a multiple of 8, so the share is that of any N.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import count_cost  # noqa: E402  (the op cases and their ResNet-50 shapes)

import fusedres  # noqa: E402
from fusedres import _cost  # noqa: E402

SIDES = [(form, channels, side) for form, channels, side, _ in count_cost.RESNET50]
CHANNELS_FIRST = ("normalize_channels_first_kernel", "stats_channels_first_kernel",
                  "reduce_channels_first_kernel", "input_grad_channels_first_kernel")


def nchw_case(form, channels, side, n=2) -> count_cost.Case:
    case = count_cost.make_case(form, n, channels, side)

    def dense(t):
        return None if t is None else t.detach().contiguous().requires_grad_(t.requires_grad)

    # float32 BN parameters: every 2-byte access is then an activation value's
    return count_cost.Case(form, dense(case.x), dense(case.residual),
                           [bn.float() for bn in case.bns], case.grad.contiguous())


def count(form, channels, side) -> dict:
    """kernel -> (bfloat16 values moved in 16-byte accesses, values moved one by one), over
    the op's training forward and backward."""
    case = nchw_case(form, channels, side)
    with _cost.count() as fwd:
        out = count_cost.fused(case, True)
    with _cost.count() as bwd:
        torch.autograd.grad(out, case.inputs, case.grad)
    result = {}
    for launch in fwd.launches + bwd.launches:
        if launch.kernel in CHANNELS_FIRST:
            vectors, singles = result.get(launch.kernel, (0, 0))
            sizes = launch.accesses_by_size  # (4-byte accesses: the float per-channel vectors)
            result[launch.kernel] = (vectors + 8 * sizes[16], singles + sizes[2])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    fusedres.set_backend("cuda-emulated")
    lines = ["| op | C x H x W | H * W % 8 | " + " | ".join(k.replace("_channels_first_kernel", "")
                                                        for k in CHANNELS_FIRST) + " |",
             "|---|---|---|" + "---|" * len(CHANNELS_FIRST)]
    with _cost.gpu_geometry(_cost.H100_SMS):
        for form, channels, side in SIDES:
            counted = count(form, channels, side)
            cells = []
            for kernel in CHANNELS_FIRST:
                vectors, singles = counted.get(kernel, (0, 0))
                cells.append(f"{100 * vectors / (vectors + singles):.0f}%"
                             if vectors + singles else "-")
            lines.append(f"| {form} | {channels} x {side} x {side} | {side * side % 8} | "
                         + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    text = "\n".join(
        ["Share of the activation values the channels-first CUDA kernels move in 16-byte "
         "accesses (bfloat16, NCHW, training forward + backward; the rest move one value an "
         "access), counted in the emulation "
         f"at {commit} ({platform.processor() or platform.machine()}, torch "
         f"{torch.__version__}):", ""] + lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
