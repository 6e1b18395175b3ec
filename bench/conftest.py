"""Benchmark helpers: sizes per device and a timer that waits for the GPU.

Run: python -m pytest bench/ --benchmark-json bench/results/<name>.json
     python bench/report.py bench/results/<name>.json      # Markdown table + PNG chart
On a GPU the sizes are ResNet-50's at N=256 (bf16, channels_last); on the CPU a small default.
"""
import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 256 if GPU else 4


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver and library versions in every saved JSON."""
    import platform

    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cudnn"] = torch.backends.cudnn.version() if GPU else None
    machine_info["python"] = platform.python_version()
    if GPU:
        machine_info["gpu"] = torch.cuda.get_device_name()
        try:
            import subprocess

            machine_info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            machine_info["driver"] = None


def sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with warm-up, each call waiting for the device."""

    def run(fn):
        def call():
            out = fn()
            sync()
            return out

        for _ in range(3):
            call()
        return benchmark.pedantic(call, rounds=20 if GPU else 5, iterations=5 if GPU else 1)

    return run


def channels_last(shape, requires_grad=False):
    t = torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)
