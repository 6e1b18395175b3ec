"""Whole-model speed: ResNet-18/50/101 and the pre-activation ResNet-50 (v2) inference (eval;
fusedres with BN folded, torch.compile with freezing) and training steps (forward, backward,
SGD), torchvision eager vs torch.compile vs fusedres (fusedres-cpp on the CPU; fusedres-cuda and
fusedres-triton on a GPU), after checking each provider's output against eager (v2: eager is
fusedres.preact's plain modules) on the same weights and inputs.
GPU: N=256, 224x224, bf16; CPU (float32): ResNet-50 (v1 and v2) inference at batch 8, 224x224
and a training step at batch 8, 160x160, ResNet-18 at 32x32 and 224x224 with batch 1 and 32
(small sizes show per-call overhead), plus the "convs-only" floor provider. Each provider's
pytest-benchmark rounds are recorded, but the figure reported (extra_info["median_s"]) is the
median of interleaved rounds of all providers of the case (fusedres.benchmark.run; CUDA events
on a GPU)."""
import pytest
import torch
from conftest import BATCH, DEVICE, DTYPE, GPU, POOL

from fusedres import benchmark as B

TOLERANCE = 5e-2 if DTYPE == torch.bfloat16 else 1e-3
PROVIDERS = B.providers(DEVICE) + ["convs-only"]  # the last: the floor, see fusedres.benchmark
# (arch, mode, image size, batch)
if GPU:
    CASES = [(arch, mode, 224, BATCH)
             for arch in ["resnet18", "resnet50", "resnet101", "preact_resnet50"]
             for mode in B.MODES]
else:  # the CPU goals: ResNet-50 (v1 and v2) at its usual sizes, ResNet-18 small and large, batch 1 and 32
    CASES = [(arch, mode, size, 8) for arch in ("resnet50", "preact_resnet50")
             for mode, size in (("inference", 224), ("train", 160))]
    # (No training step at 32x32, batch 1: the last stage's BN then sees one value per
    # channel, which training BN refuses in PyTorch as in fusedres.)
    CASES += [("resnet18", mode, size, batch) for mode in B.MODES for size in (32, 224)
              for batch in (1, 32) if (mode, size, batch) != ("train", 32, 1)]


_SIDE_BY_SIDE: dict = {}


def side_by_side(arch, mode, size, batch) -> dict:
    """{provider: median seconds per step} of every provider of one case, timed in
    interleaved rounds (fusedres.benchmark.run): the figure the report uses, since this
    machine's load moves separate runs by more than the differences measured."""
    key = (arch, mode, size, batch)
    if key not in _SIDE_BY_SIDE:
        results = B.run([arch], modes=(mode,), names=PROVIDERS, batch=batch,
                        size=size, device=DEVICE, dtype=DTYPE, iters=20 if GPU else 15,
                        progress=False)
        _SIDE_BY_SIDE[key] = {r.provider: r.seconds for r in results}
    return _SIDE_BY_SIDE[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("arch, mode, size, batch", CASES,
                         ids=[f"{a}-{m}-{s}px-b{b}" for a, m, s, b in CASES])
def test_model(benchmark, arch, mode, size, batch, provider):
    reference = B.reference_model(arch, DEVICE, DTYPE, True, 1000)
    pool = [(torch.randn(batch, 3, size, size, device=DEVICE, dtype=DTYPE).to(
        memory_format=torch.channels_last), torch.randint(0, 1000, (batch,), device=DEVICE))
        for _ in range(POOL)]
    _, ref_step = B.build("eager", reference, mode)
    _, step = B.build(provider, reference, mode)
    error = B.relative_error(step(*pool[0]), ref_step(*pool[0]))
    if provider != "convs-only":  # (another function: the floor)
        assert error <= TOLERANCE, f"{provider} differs from eager: {error:.2e}"
    del reference, ref_step  # peak memory counts only the benchmarked model
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(3):  # warm-up (compiles)
        step(*pool[i])
    index = iter(range(10**9))

    def timed():
        out = step(*pool[next(index) % len(pool)])
        if GPU:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(batch=batch, size=size, dtype=str(DTYPE), device=DEVICE,
                                rel_error=error, arch=arch, mode=mode, provider=provider,
                                calls_per_round=1)
    benchmark.pedantic(timed, rounds=10 if GPU else 3, iterations=1)
    if GPU:
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info["median_s"] = side_by_side(arch, mode, size, batch)[provider]
