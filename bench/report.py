"""Turns pytest-benchmark JSON from bench/test_bench_models.py into a Markdown table (img/s,
speed-up over eager and over torch.compile, peak memory) and a PNG bar chart.

    python bench/report.py bench/results/RUN.json [--out bench/results/RUN]
writes RUN.md and RUN.png (the chart needs matplotlib: pip install -e ".[bench]").
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fusedres.benchmark import Result, markdown_table  # noqa: E402


def load(path):
    with open(path) as f:
        data = json.load(f)
    results = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "arch" not in info:
            continue  # a per-op benchmark
        results.append(Result(info["arch"], info["mode"], info["provider"], info["batch"],
                              bench["stats"]["median"], info["rel_error"],
                              info.get("peak_memory_mib")))
    return data.get("machine_info", {}), data.get("datetime"), results


def header(machine, when):
    gpu = machine.get("gpu") or machine.get("cpu", {}).get("brand_raw", "CPU")
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "triton", "cudnn", "driver")
                         if machine.get(k))
    return f"{gpu}; {versions}; {when}"


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
    machine, when, results = load(args.json)
    if not results:
        print("no model benchmarks in", args.json)
        return 1
    out = args.out or os.path.splitext(args.json)[0]
    table = f"{header(machine, when)}\n\n{markdown_table(results)}\n"
    with open(out + ".md", "w") as f:
        f.write(table)
    print(table)
    try:
        chart(results, out + ".png")
        print("chart:", out + ".png")
    except ImportError:
        print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
