"""The Triton kernels compile for real GPUs (sm_90 and sm_80), every tile config with the
specialisations of ResNet-50's arguments, checked without one (tests/compile_triton_kernels.py,
run in one process per core)."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.triton
def test_triton_kernels_compile_for_gpus():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "compile_triton_kernels.py"),
                               "--shard", f"{i}/{shards}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(shards)]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
        assert "compiled" in out
    compiled = sum(int(out.split("compiled ")[-1].split()[0]) for out in outputs)
    assert compiled > 300  # every config of every tuned kernel, two architectures
