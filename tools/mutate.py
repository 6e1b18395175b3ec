#!/usr/bin/env python
"""Mutation harness: does the test suite catch the bugs it claims to?

Each entry of the catalog (tools/mutations.py) plants one plausible bug in a temporary copy
of the repository, runs the tests meant to catch it there, and records whether they fail
(killed) or pass (survived). A C++ or CUDA mutation rebuilds the extension it changes in the
copy (about a minute each; the CUDA kernels run in their emulation build); Python and Triton
mutations reuse the built extensions (the Triton kernels run under the interpreter). The
checkout itself is never modified.

    python tools/mutate.py                      # whole catalog -> tools/mutation_report.md
    python tools/mutate.py --only dual-eps,c-stats-last-block
    python tools/mutate.py --check              # every mutation still applies (no tests run)
    python tools/mutate.py --tests-from REV --report /tmp/before.md   # an older test suite

Before the mutations, each distinct test selection is run once unmutated: a selection that
fails without a bug kills nothing, and the harness stops there. Needs a checkout built
from its current sources (`pip install -e .`): the copies reuse its compiled extensions.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from mutations import CATALOG, Mutation  # noqa: E402

PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
          "-m", "not slow"]


def mutated(mutation: Mutation, root: Path) -> str:
    """root's mutation.path with the bug planted; the text to replace must occur once."""
    text = (root / mutation.path).read_text()
    found = text.count(mutation.old)
    if found != 1:
        raise ValueError(f"{mutation.id}: {mutation.old!r} occurs {found} times in "
                         f"{mutation.path} (must be exactly once: update the catalog)")
    return text.replace(mutation.old, mutation.new)


def copy_checkout(tests_from: str | None) -> Path:
    """A temporary copy of the working tree (tracked and untracked, not ignored, files) and the
    built extension (the .so files)."""
    dest = Path(tempfile.mkdtemp(prefix="fusedres-mutant-"))
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    built = [p.relative_to(ROOT) for p in (ROOT / "fusedres").glob("_C*.so")]
    built.append(Path("fusedres/_build_info.py"))
    # setup.py's build cache: a C++ mutation then rebuilds only the extension it changes.
    built += [p.relative_to(ROOT) for p in (ROOT / "build" / "cache").glob("*.so")]
    for rel in [f for f in files if f] + [str(p) for p in built]:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The Triton kernels are the package fusedres.kernels (package_dir in setup.py): without
    # this link, an editable install would import them from the checkout, not the copy.
    (dest / "fusedres" / "kernels").symlink_to(Path("..") / "kernels")
    if tests_from:
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def environment(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("FUSEDRES_BACKEND", None)
    return env


def rebuild(root: Path, timeout: float) -> tuple[bool, str]:
    """Rebuilds the CPU extensions in root: the C++ kernels and the emulation build of the
    CUDA kernels (the CUDA build itself cannot run without a GPU)."""
    env = dict(environment(root), FUSEDRES_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    for so in (root / "fusedres").glob("_C*.so"):
        so.unlink()
    try:
        done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                              cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "build timed out"
    return done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome is passed, failed, crashed, timeout or error."""
    # Files this test suite has (an older one may lack some), each once.
    tests = [t for t in dict.fromkeys(tests) if (root / t.split("::")[0]).exists()]
    if not tests:
        return "error", "none of the selected test files exists", 0.0
    start = time.monotonic()
    try:
        done = subprocess.run(PYTEST + tests, cwd=root, env=environment(root),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    if done.returncode == 0:
        return "passed", "", seconds
    if done.returncode == 1:
        failed = re.findall(r"^FAILED (\S+)", output, re.M)
        return "failed", failed[0] if failed else output.strip().splitlines()[-1], seconds
    if done.returncode < 0:  # the test process died (a kernel crash is a loud failure too)
        return "crashed", f"the tests crashed ({signal.Signals(-done.returncode).name})", seconds
    return "error", output.strip()[-2000:], seconds


def run_mutation(mutation: Mutation, tests_from: str | None, timeout: float) -> dict:
    root = copy_checkout(tests_from)
    try:
        try:
            (root / mutation.path).write_text(mutated(mutation, root))
        except ValueError as e:  # the catalog no longer matches the sources
            return dict(result="error", detail=str(e), seconds=0.0)
        if mutation.path.startswith("csrc/"):
            ok, log = rebuild(root, timeout)
            if not ok:
                return dict(result="error", detail="rebuild failed: " + log[-500:], seconds=0.0)
        outcome, detail, seconds = run_tests(root, mutation.tests, timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"failed": "killed", "crashed": "killed", "timeout": "killed",
              "passed": "survived"}.get(outcome, "error")
    return dict(result=result, detail=detail if outcome != "timeout" else "timeout: " + detail,
                seconds=seconds)


def check_imports(root: Path) -> None:
    """The copy's fusedres and kernels are the ones imported there (not the checkout's)."""
    where = subprocess.run(
        [sys.executable, "-c", "import fusedres, fusedres.kernels as k; "
         "import fusedres._C as c; print(fusedres.__file__, k.__file__, c.__file__)"],
        cwd=root, env=environment(root), capture_output=True, text=True, check=True).stdout
    for path in where.split():
        if not Path(path).resolve().is_relative_to(root.resolve()):
            sys.exit(f"the copy imports {path} from outside it: mutations would not apply")


def check_baselines(mutations: list[Mutation], tests_from: str | None, timeout: float) -> None:
    """Every distinct selection passes on the unmutated copy, or the harness stops."""
    root = copy_checkout(tests_from)
    try:
        for tests in sorted({tuple(m.tests) for m in mutations}):
            outcome, detail, seconds = run_tests(root, list(tests), timeout)
            print(f"baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s)", flush=True)
            if outcome != "passed":
                sys.exit(f"the unmutated tests fail ({detail}); fix them first")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def versions() -> str:
    import torch
    import triton

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core {cpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, triton {triton.__version__}")


def report(rows: list[tuple[Mutation, dict]], tests_from: str | None, elapsed: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    killed = sum(r["result"] == "killed" for _, r in rows)
    survived = [(m, r) for m, r in rows if r["result"] == "survived"]
    errors = [(m, r) for m, r in rows if r["result"] == "error"]
    unexplained = [m for m, _ in survived if not m.equivalent]
    lines = [
        "# Mutation report",
        "",
        f"Sources at {commit}; tests from {tests_from or 'the same commit'}. "
        f"{versions()}. Generated by `python tools/mutate.py` in {elapsed / 60:.0f} min.",
        "",
        f"**{killed} of {len(rows)} mutations killed** ({100 * killed / max(len(rows), 1):.0f}%); "
        f"{len(survived)} survived ({len(survived) - len(unexplained)} argued equivalent), "
        f"{len(errors)} errors.",
        "",
        "| id | where | planted bug | result | first failing test (or why equivalent) | s |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in rows:
        note = r["detail"] if r["result"] != "survived" else (m.equivalent or "**a gap**")
        note = note.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {m.id} | {m.path} | {m.bug} | {r['result']} | {note} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Tests run per mutation (pytest -x -m 'not slow'):", ""]
    for tests in sorted({" ".join(m.tests) for m, _ in rows}):
        ids = ", ".join(m.id for m, _ in rows if " ".join(m.tests) == tests)
        lines.append(f"- `{tests}`: {ids}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutation applies")
    parser.add_argument("--tests-from", metavar="REV",
                        help="run the tests of another git revision (a before/after comparison)")
    parser.add_argument("--report", default=str(ROOT / "tools" / "mutation_report.md"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run of each selection")
    args = parser.parse_args()

    mutations = CATALOG
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {m.id for m in CATALOG}
        if unknown:
            sys.exit(f"unknown mutation ids: {', '.join(sorted(unknown))}")
        mutations = [m for m in CATALOG if m.id in wanted]
    if args.check:
        for m in mutations:
            mutated(m, ROOT)
        print(f"all {len(mutations)} mutations apply")
        return

    start = time.monotonic()
    root = copy_checkout(args.tests_from)
    try:
        check_imports(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_baseline:
        check_baselines(mutations, args.tests_from, args.timeout)
    rows = []
    for i, m in enumerate(mutations, 1):
        r = run_mutation(m, args.tests_from, args.timeout)
        print(f"[{i}/{len(mutations)}] {m.id}: {r['result']} ({r['seconds']:.0f} s) {r['detail']}",
              flush=True)
        rows.append((m, r))
    Path(args.report).write_text(report(rows, args.tests_from, time.monotonic() - start))
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
