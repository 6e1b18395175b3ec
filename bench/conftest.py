"""Benchmark helpers: sizes per device and a timer that waits for the GPU.

Run: python -m pytest bench/ --benchmark-json bench/results/<name>.json
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
