"""Whole-model speed: torchvision eager, torch.compile and fusedres side by side on the same
inputs, after checking that they agree. Used by `python -m fusedres` and bench/.

Timing: warm-up, then the median of timed iterations (CUDA events on a GPU), with inputs
rotated through a small pool so no run reuses the previous one's cache.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fusedres

MODES = ("inference", "train")


@dataclass
class Result:
    arch: str
    mode: str
    provider: str
    batch: int
    seconds: float  # median per iteration
    max_error: float  # relative error of the output against eager
    memory_mb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds


# fusedres providers and the backend each runs on ("fusedres": the automatic choice).
FUSED_BACKENDS = {"fusedres": "auto", "fusedres-cpp": "cpp", "fusedres-cuda": "cuda",
                  "fusedres-triton": "triton"}
# "convs-only": torchvision eager with every BN and ReLU removed, the convolutions (and pooling,
# fc) alone: the floor a fused model approaches where convolutions are the work. Not the same
# function, so its output is not compared.
PROVIDERS = ("eager", "compile", *FUSED_BACKENDS, "convs-only")


def convolutions_only(model: torch.nn.Module) -> torch.nn.Module:
    """model with each BatchNorm2d and ReLU replaced by Identity (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.ReLU)):
                setattr(module, name, torch.nn.Identity())
    return model


def providers(device: str) -> list[str]:
    """The default side-by-side set on `device`: eager, torch.compile, and each compiled
    fusedres backend that can run there."""
    from ._backend import unavailable_reason

    names = ["eager", "compile"]
    native = "cuda" if device == "cuda" else "cpp"
    if unavailable_reason(native, device) is None:
        names.append(f"fusedres-{native}")
    if device == "cuda" and unavailable_reason("triton", device) is None:
        names.append("fusedres-triton")  # (on the CPU only the slow interpreter could run it)
    if len(names) == 2:
        names.append("fusedres")  # no compiled backend: the reference composition
    return names


def reference_model(arch: str, device, dtype, channels_last, num_classes):
    """The unfused `arch` with seeded weights, on device / dtype / layout: torchvision's
    model, or for a pre-activation ResNet ("preact_resnet50", ...) fusedres.preact's plain
    modules."""
    import torchvision

    torch.manual_seed(0)
    if arch in fusedres.preact.BUILDERS:
        model = fusedres.unconvert(fusedres.get_model(arch, num_classes=num_classes))
    else:
        model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build(provider: str, reference: torch.nn.Module, mode: str):
    """(model, step) for one provider: step(x, target) runs one inference or training step and
    returns the output."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    model = copy.deepcopy(reference)
    backend = FUSED_BACKENDS.get(provider, "auto")
    if provider in FUSED_BACKENDS:
        model = fusedres.convert(model)
    elif provider == "convs-only":
        model = convolutions_only(model)
    model.train(mode == "train")
    if mode == "inference":
        if provider in FUSED_BACKENDS or provider == "convs-only":  # (as compile's
            # freezing: a snapshot; on the CPU with oneDNN-prepacked convolution weights,
            # elsewhere BN folded; for the floor too, so that it stays one)
            model = fusedres.freeze(model)
        forward = model
        if provider == "compile":
            forward = torch.compile(model, options={"freezing": True})

        def step(x, target):
            with torch.no_grad(), fusedres.backend(backend):
                return forward(x)

        return model, step

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if provider == "compile" else model

    def step(x, target):
        with fusedres.backend(backend):
            optimizer.zero_grad(set_to_none=True)
            out = forward(x)
            F.cross_entropy(out.float(), target).backward()
            optimizer.step()
        return out.detach()

    return model, step


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step, x, target, device) -> float:
    """Seconds one step takes (CUDA events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(x, target)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step(x, target)
    return time.perf_counter() - t0


def time_step(step, inputs, device, warmup: int, iters: int) -> float:
    """Median seconds per step over `iters` timed steps, inputs rotated."""
    for i in range(warmup):
        step(*inputs[i % len(inputs)])
    _synchronize(device)
    return statistics.median(_time_once(step, *inputs[i % len(inputs)], device)
                             for i in range(iters))


def relative_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(archs, modes=MODES, names=None, batch=4, size=96, device="cpu", dtype=torch.float32,
        channels_last=True, warmup=3, iters=10, num_classes=1000, progress=True):
    """Benchmarks every (arch, mode, provider); returns a list of Result. The providers of one
    (arch, mode) are timed side by side: one step of each per round, in a rotating order, so
    a shared machine's load changes hit all of them alike; the median over rounds is kept."""
    names = names or providers(device)
    groups = [(a, m) for a in archs for m in modes]
    results = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pool = [(torch.randn(batch, 3, size, size, device=device, dtype=dtype).to(memory_format=fmt),
             torch.randint(0, num_classes, (batch,), device=device)) for _ in range(3)]
    for n, (arch, mode) in enumerate(groups):
        if progress:
            _progress(n, len(groups), f"{arch} {mode}")
        reference = reference_model(arch, device, dtype, channels_last, num_classes)
        expected = build("eager", reference, mode)[1](*pool[0])
        steps, errors, memory = {}, {}, {}
        for provider in names:
            base = _allocated(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, step = build(provider, reference, mode)
            got = step(*pool[0])  # same weights, same first batch: the outputs must agree
            errors[provider] = relative_error(got, expected)
            del got
            for i in range(warmup):
                step(*pool[i % len(pool)])
            _synchronize(device)
            if device == "cuda":  # the provider's model and its step's peak on top of it
                memory[provider] = (torch.cuda.max_memory_allocated() - base) / 2**20
            steps[provider] = step
        del reference, expected
        times = {provider: [] for provider in names}
        for i in range(iters):
            order = names[i % len(names):] + names[:i % len(names)]
            for provider in order:
                times[provider].append(_time_once(steps[provider], *pool[i % len(pool)], device))
        for provider in names:
            results.append(Result(arch, mode, provider, batch, statistics.median(times[provider]),
                                  errors[provider], memory.get(provider)))
        del steps
    if progress:
        _progress(len(groups), len(groups), "done")
        print(file=sys.stderr)
    return results


def _allocated(device) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def _progress(done: int, total: int, what: str, width: int = 24) -> None:
    """One self-overwriting line on stderr: [#####-------] 3/12 resnet50 train compile."""
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {what:32}", end="",
          file=sys.stderr, flush=True)


def markdown_table(results) -> str:
    """img/s per provider, with speed-ups over eager and over torch.compile."""
    by_key = {(r.arch, r.mode, r.provider): r for r in results}
    lines = ["| model | mode | provider | img/s | vs eager | vs compile | ms / step | "
             + "rel. error | peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        speedup = {}
        for name in ("eager", "compile"):
            base = by_key.get((r.arch, r.mode, name))
            speedup[name] = f"{base.seconds / r.seconds:.2f}x" if base else "-"
        memory = f"{r.memory_mb:.0f}" if r.memory_mb is not None else "-"
        lines.append(f"| {r.arch} | {r.mode} | {r.provider} | {r.images_per_second:,.1f} | "
                     f"{speedup['eager']} | {speedup['compile']} | {r.seconds * 1e3:.2f} | "
                     f"{r.max_error:.1e} | {memory} |")
    return "\n".join(lines)


def _trained_like_norms(model: torch.nn.Module) -> None:
    """Gives every BN weights, biases and running statistics spread as a trained model's are.
    A fresh model's (1, 0, 0, 1) make each eval BN an identity that checks no BN arithmetic,
    and its scale of 1 / sqrt(1 + eps) puts a bfloat16 model's residual sums just below
    rounding ties: a correctly rounded fused BN + add then rounds them all down, a bias that
    compounds over the blocks (the unfused path rounds the BN first, to the tie itself)."""
    g = torch.Generator().manual_seed(1)

    def spread(t, low, high):
        t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    spread(m.weight, 0.5, 1.5)
                    spread(m.bias, -0.2, 0.2)
                if m.running_mean is not None:
                    spread(m.running_mean, -0.2, 0.2)
                    spread(m.running_var, 0.5, 2.0)


def check_model(arch="resnet50", device="cpu", dtype=torch.float32, batch=4, size=96,
                num_classes=1000):
    """fusedres (a converted reference_model) and the unfused reference itself, both against
    the reference in float64: eval output, and output, parameters and running statistics after
    one SGD step. Returns {check: (fusedres error, reference error)}, relative errors."""
    reference = reference_model(arch, device, dtype, True, num_classes)
    _trained_like_norms(reference)
    fused = fusedres.convert(copy.deepcopy(reference))
    reference64 = copy.deepcopy(reference).double()
    models = (fused, reference, reference64)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (batch,), device=device)

    def inputs(model):
        return x.double() if model is reference64 else x

    def compare(values):
        return (relative_error(values[0], values[2]), relative_error(values[1], values[2]))

    errors = {}
    with torch.no_grad():
        errors["eval output"] = compare([m.eval()(inputs(m)) for m in models])
    outs = []
    for model in models:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        out = model(inputs(model))
        F.cross_entropy(out.float() if model is not reference64 else out, target).backward()
        optimizer.step()
        outs.append(out.detach())
    errors["train output"] = compare(outs)
    errors["parameters after a step"] = compare(
        [torch.cat([p.detach().double().flatten() for p in m.parameters()]) for m in models])
    errors["running statistics"] = compare(
        [torch.cat([b.double().flatten() for n, b in m.named_buffers() if "running" in n])
         for m in models])
    return errors
