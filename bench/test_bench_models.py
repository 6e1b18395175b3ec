"""Whole-model speed: ResNet-18/50/101 inference (eval; fusedres with BN folded, torch.compile
with freezing) and training steps (forward, backward, SGD), torchvision eager vs
torch.compile vs fusedres, after checking each provider's output against eager on the same
weights and inputs. GPU: N=256, 224x224, bf16; CPU: a small default (ResNet-18/50)."""
import pytest
import torch

import fusedres
from fusedres import benchmark as B
from conftest import BATCH, DEVICE, DTYPE, GPU

torchvision = pytest.importorskip("torchvision")

ARCHS = ["resnet18", "resnet50", "resnet101"] if GPU else ["resnet18", "resnet50"]
SIZE = 224 if GPU else 64
TOLERANCE = 5e-2 if DTYPE == torch.bfloat16 else 1e-3


@pytest.mark.parametrize("provider", B.providers(DEVICE))
@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_model(benchmark, arch, mode, provider):
    reference = B.torchvision_model(arch, DEVICE, DTYPE, True, 1000)
    pool = [(torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).to(
        memory_format=torch.channels_last), torch.randint(0, 1000, (BATCH,), device=DEVICE))
        for _ in range(3)]
    _, ref_step = B.build("eager", reference, mode)
    _, step = B.build(provider, reference, mode)
    error = B.relative_error(step(*pool[0]), ref_step(*pool[0]))
    assert error <= TOLERANCE, f"{provider} differs from eager: {error:.2e}"
    for i in range(3):  # warm-up (compiles)
        step(*pool[i])
    index = iter(range(10**9))

    def timed():
        out = step(*pool[next(index) % len(pool)])
        if GPU:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(batch=BATCH, size=SIZE, dtype=str(DTYPE), device=DEVICE,
                                rel_error=error, arch=arch, mode=mode, provider=provider)
    benchmark.pedantic(timed, rounds=10 if GPU else 3, iterations=1)
    if GPU:
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    fusedres.set_backend("auto")
