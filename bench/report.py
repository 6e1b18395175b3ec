"""Turns pytest-benchmark JSON from bench/ into Markdown tables and a PNG bar chart.

    python bench/report.py bench/results/RUN.json [--out bench/results/RUN]
writes RUN.md (whole models: img/s, speed-up over eager and over torch.compile, peak memory;
per op: time, speed-ups, achieved bandwidth against the measured copy bandwidth) and RUN.png
(the models chart; needs matplotlib: pip install -e ".[bench]").
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fusedres.benchmark import Result, markdown_table


def seconds(bench):
    """Median seconds per call: the recorded median (interleaved rounds for the models,
    CUDA events for the ops on a GPU) when there is one, else pytest-benchmark's wall-clock
    median of a round divided by the calls in it."""
    info = bench.get("extra_info", {})
    if "median_s" in info:
        return info["median_s"]
    return bench["stats"]["median"] / info.get("calls_per_round", 1)


def load(path):
    with open(path) as f:
        data = json.load(f)
    models, ops = [], []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "arch" in info:
            # one row group per model and input size (the same model runs at several sizes)
            label = f"{info['arch']} {info['size']}px b{info['batch']}"
            models.append(Result(label, info["mode"], info["provider"], info["batch"],
                                 seconds(bench), info["rel_error"],
                                 info.get("peak_memory_mib")))
        else:
            ops.append(bench)
    return data.get("machine_info", {}), data.get("datetime"), models, ops


def header(machine, when):
    gpu = machine.get("gpu") or machine.get("cpu", {}).get("brand_raw", "CPU")
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "triton", "cudnn", "driver")
                         if machine.get(k))
    bandwidth = machine.get("copy_bandwidth_gbs")
    copy = f"; copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""
    return f"{gpu}; {versions}{copy}; {when}"


def op_table(ops, copy_gbs):
    """One row per (op, case, provider): median time, speed-ups, achieved bandwidth."""
    rows = []
    for bench in ops:
        provider = bench["params"]["provider"]
        case = bench["param"].replace(f"-{provider}", "").replace(provider, "") or "-"
        op = bench["name"].split("[")[0].removeprefix("test_")
        rows.append((op, case, provider, seconds(bench), bench.get("extra_info", {})))
    base = {(op, case, p): s for op, case, p, s, _ in rows}
    lines = ["| op | case | provider | median us | vs eager | vs compile | GB/s | % of copy |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for op, case, provider, s, info in rows:
        speedup = {name: f"{base[op, case, name] / s:.2f}x" if (op, case, name) in base else "-"
                   for name in ("eager", "compile")}
        gbs = info["bytes"] / s / 1e9 if "bytes" in info else None
        lines.append(f"| {op} | {case} | {provider} | {s * 1e6:,.1f} | {speedup['eager']} | "
                     f"{speedup['compile']} | {f'{gbs:,.1f}' if gbs else '-'} | "
                     f"{f'{100 * gbs / copy_gbs:.0f}%' if gbs and copy_gbs else '-'} |")
    return "\n".join(lines)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.arch, r.mode) for r in results}, key=lambda g: (g[1], g[0]))
    names = list(dict.fromkeys(r.provider for r in results))
    by_key = {(r.arch, r.mode, r.provider): r.images_per_second for r in results}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4))
    for i, name in enumerate(names):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [by_key.get((a, m, name), 0) for a, m in groups], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{a}\n{m}" for a, m in groups])
    ax.set_ylabel("images / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json")
    parser.add_argument("--out", default=None, help="output path without extension")
    args = parser.parse_args(argv)
    machine, when, models, ops = load(args.json)
    if not models and not ops:
        print("no benchmarks in", args.json)
        return 1
    out = args.out or os.path.splitext(args.json)[0]
    parts = [header(machine, when)]
    if models:
        parts.append("### Whole models\n\n" + markdown_table(models))
    if ops:
        parts.append("### Per op\n\n" + op_table(ops, machine.get("copy_bandwidth_gbs")))
    text = "\n\n".join(parts) + "\n"
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    if models:
        try:
            chart(models, out + ".png")
            print("chart:", out + ".png")
        except ImportError:
            print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
