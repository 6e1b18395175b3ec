"""Benchmark helpers: sizes per device, machine info, and the `timed` fixture.

Run: python -m pytest bench/ --benchmark-json bench/results/<name>.json
     python bench/report.py bench/results/<name>.json      # Markdown tables + PNG chart
On a GPU the sizes are ResNet-50's at N=256 (bf16, channels_last); on the CPU a small default.

Timing. Every timed function is warmed up first (which also compiles), and its inputs rotate
through a small pool so no call reuses the previous call's cache. On a GPU each pytest-benchmark
round runs several calls back to back and waits for the device once at its end, and the
median of CUDA-event timings (triton.testing.do_bench, which also flushes the L2 cache before
each call) is recorded as extra_info["median_s"]; bench/report.py prefers that figure.
"""
import functools

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 256 if GPU else 4
POOL = 3  # inputs rotated through


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@functools.cache
def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write): the practical
    bandwidth floor the memory-bound ops are measured against."""
    from fusedres.benchmark import time_step

    numel = (1 << 28) if GPU else (1 << 24)  # 512 MiB / 32 MiB of bf16 / fp32 (> any cache)
    src = torch.empty(numel, device=DEVICE, dtype=DTYPE).uniform_()
    dst = torch.empty_like(src)
    seconds = time_step(lambda *_: dst.copy_(src), [(None, None)], DEVICE, warmup=2, iters=10)
    return 2 * src.numel() * src.element_size() / seconds


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver and library versions, and the copy bandwidth, in every saved JSON."""
    import platform

    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cudnn"] = torch.backends.cudnn.version() if GPU else None
    machine_info["python"] = platform.python_version()
    machine_info["copy_bandwidth_gbs"] = copy_bandwidth() / 1e9
    if GPU:
        machine_info["gpu"] = torch.cuda.get_device_name()
        try:
            import subprocess

            machine_info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            machine_info["driver"] = None


@pytest.fixture
def timed(benchmark):
    """timed(fn, pool, bytes_moved=None): times fn(*args) with args rotating through pool.

    bytes_moved: the bytes the op must read and write at the least, recorded so the report
    can give the achieved bandwidth."""

    def run(fn, pool, bytes_moved=None):
        calls = iter(range(10**12))

        def call():
            return fn(*pool[next(calls) % len(pool)])

        for _ in range(3):
            call()
        if bytes_moved is not None:
            benchmark.extra_info["bytes"] = bytes_moved
        if not GPU:
            benchmark.extra_info["calls_per_round"] = 1
            return benchmark.pedantic(call, rounds=5, iterations=1)
        import triton.testing

        benchmark.extra_info["median_s"] = triton.testing.do_bench(
            call, warmup=25, rep=200, return_mode="median") / 1e3

        benchmark.extra_info["calls_per_round"] = 10

        def round_of_calls():
            for _ in range(9):
                call()
            out = call()
            torch.cuda.synchronize()
            return out

        return benchmark.pedantic(round_of_calls, rounds=10, iterations=1)

    return run


def channels_last(shape, requires_grad=False):
    t = torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def pool_of(*shapes, requires_grad=False):
    """POOL tuples of fresh channels_last inputs of the given shapes (None stays None)."""
    return [tuple(None if s is None else channels_last(s, requires_grad) for s in shapes)
            for _ in range(POOL)]
