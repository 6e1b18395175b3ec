"""python -m fusedres: checks this installation end to end, then benchmarks it.

1. Prints what was built and loaded, and runs every fused op on each compiled backend (cpp,
   cuda, triton, and cuda-emulated: the CUDA kernels' emulation build) available for each
   device against the unfused computation in float64 (float32 convolutions without TF32).
2. Checks fusedres ResNet-50 against torchvision: eval output, and output, parameters and
   running statistics after one training step.
3. Benchmarks ResNet-50 inference and training steps against torchvision eager and
   torch.compile, and prints the table: on a GPU at full size (bf16, channels_last, N=256,
   224x224), on a CPU at a small default.
Exits non-zero if any check is off.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF

# Relative norm error against float64 (ARCHITECTURE.md); float32 through a convolution: 1e-4.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CONV_TOLERANCE = {**TOLERANCE, torch.float32: 1e-4}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def checks(device, dtype, shape):
    """(name, fused result, fp64 reference) for each op on one device / dtype."""
    C = shape[1]
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    z = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    xd, zd = x.double(), z.double()

    def bn(t, training):
        return F.batch_norm(t, rm.double(), rv.double(), w.double(), b.double(), training)

    yield ("bn_relu train", FF.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, True),
           torch.relu(bn(xd, True)))
    yield ("bn_relu eval", FF.batch_norm_relu(x, rm, rv, w, b, False), torch.relu(bn(xd, False)))
    yield ("bn_add_relu train", FF.batch_norm_add_relu(x, z, rm.clone(), rv.clone(), w, b, True),
           torch.relu(bn(xd, True) + zd))
    yield ("dual_bn_add_relu train",
           FF.dual_batch_norm_add_relu(x, z, rm.clone(), rv.clone(), rm.clone(), rv.clone(),
                                       w, b, w, b, True),
           torch.relu(bn(xd, True) + bn(zd, True)))
    yield ("add_relu", FF.add_relu(x, z), torch.relu(xd + zd))
    if device == "cpu" and dtype == torch.bfloat16 and fusedres.get_backend() == "triton":
        return  # the Triton interpreter's bfloat16 matrix product is wrong (refused)
    conv_w = (torch.randn(C, C, 3, 3, device=device) * 0.1).to(dtype)
    fw, fb = FF.fold_conv_bn(conv_w, None, rm, rv, 1e-5, w, b)
    ref_conv = bn(F.conv2d(xd, conv_w.double(), None, 1, 1), False)
    yield ("fold + conv_bias_add_relu", FF.conv_bias_add_relu(x, fw, fb, z, 1, 1),
           torch.relu(ref_conv + zd))


# torchvision's ResNets, which fusedres.convert() fuses (any other model would check nothing),
# and the pre-activation ResNets of fusedres.preact (checked against their plain modules).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
         "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
         "preact_resnet152")
CHECK_BACKENDS = ("cpp", "cuda", "triton", "cuda-emulated", "reference")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def provider_list(text: str) -> list:
    from .benchmark import PROVIDERS

    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in PROVIDERS:
            raise argparse.ArgumentTypeError(
                f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return names


def check_args(parser, args) -> None:
    """Argument combinations argparse cannot check alone; exits (status 2) on a bad one."""
    # A ResNet's last stage is ceil(size / 32) pixels wide, and the training step's batch
    # norm needs more than one value per channel there.
    last = -(-args.size // 32)
    if not args.ops_only and min(args.batch, 8) * last * last < 2:
        parser.error(f"--batch {args.batch} with --size {args.size} leaves one value per channel "
                     f"in the last stage ({last}x{last} pixels), too few for training batch norm: "
                     f"use --batch 2 or more, or --size 33 or more")
    if args.providers:
        from .benchmark import FUSED_BACKENDS

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for name in args.providers:
            backend = FUSED_BACKENDS.get(name, "auto")
            why = None if backend == "auto" else fusedres._backend.unavailable_reason(backend,
                                                                                      device)
            if why is not None:
                why = fusedres.info()["unavailable_reasons"].get(backend) or why
                parser.error(f"argument --providers: {name} cannot run on this machine: {why}")


@contextlib.contextmanager
def ieee_float32():
    """float32 convolutions and matrix products in IEEE float32 while checking: PyTorch's
    default TF32 (Ampere and later) keeps a 10-bit mantissa, far beyond the 1e-4 tolerance,
    for fusedres and the reference alike. The user's settings are restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=None, choices=CHECK_BACKENDS,
                        help="check only this backend (default: every available compiled one)")
    gpu = torch.cuda.is_available()
    parser.add_argument("--arch", default="resnet50", choices=ARCHS,
                        help="model to check and benchmark (a torchvision ResNet or a "
                        "pre-activation ResNet)")
    parser.add_argument("--batch", type=positive_int, default=256 if gpu else 4)
    parser.add_argument("--size", type=positive_int, default=224 if gpu else 96,
                        help="image size")
    parser.add_argument("--iters", type=positive_int, default=20 if gpu else 5,
                        help="timed steps")
    parser.add_argument("--providers", type=provider_list, default=None,
                        help="comma-separated subset of eager,compile,fusedres,fusedres-cpp,"
                             "fusedres-cuda,fusedres-triton")
    parser.add_argument("--ops-only", action="store_true", help="stop after the op checks")
    args = parser.parse_args(argv)
    check_args(parser, args)

    info = fusedres.info()
    print(f"fusedres {fusedres.__version__}  torch {info['torch']}")
    print(f"  built:   C++ {info['built']['cpp']}, CUDA {info['built']['cuda']} "
          f"({info['built']['cuda_reason']})")
    print(f"  loaded:  C++ {info['loaded']['cpp']}, CUDA {info['loaded']['cuda']}")
    print(f"  backends available: {', '.join(k for k, v in info['available'].items() if v)}")
    for name, why in info["unavailable_reasons"].items():
        print(f"  {name}: unavailable, {why}")
    print(f"  active: {info['active']} -> {info['resolved']}")

    torch.manual_seed(0)
    devices = [("cpu", (4, 16, 9, 9))]
    if torch.cuda.is_available():
        devices.append(("cuda", (32, 64, 28, 28)))
    failures = checked = 0
    print(f"\n{'op':28} {'device':6} {'dtype':9} {'backend':9} {'rel. error':>10}")
    backends = [args.backend] if args.backend else CHECK_BACKENDS[:-1]
    for device, shape in devices:
        for backend in backends:
            if fusedres._backend.unavailable_reason(backend, device) is not None:
                continue
            with fusedres.backend(backend), ieee_float32():
                for dtype in TOLERANCE:
                    for name, out, ref in checks(device, dtype, shape):
                        err = rel_err(out, ref)
                        ok = err <= (CONV_TOLERANCE if "conv" in name else TOLERANCE)[dtype]
                        failures += not ok
                        checked += 1
                        print(f"{name:28} {device:6} {str(dtype)[6:]:9} {backend:9} {err:10.2e}"
                              f"{'' if ok else '  FAILED'}")
    if checked == 0:
        why = info["unavailable_reasons"].get(args.backend, "")
        print(f"\nnothing checked: backend {args.backend!r} cannot run on this machine: {why}")
        return 1
    print(f"\n{'all op checks passed' if failures == 0 else f'{failures} op check(s) FAILED'}")
    if args.ops_only or failures:
        return 1 if failures else 0
    return models(args)


def models(args) -> int:
    from . import benchmark

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reference = "plain" if args.arch.startswith("preact_") else "torchvision"
    print(f"\n{args.arch}: fusedres and {reference} ({device}, {str(dtype)[6:]}, batch "
          f"{min(args.batch, 8)}), each against {reference} in float64:")
    errors = benchmark.check_model(args.arch, device, dtype, batch=min(args.batch, 8),
                                   size=args.size)
    failed = 0
    print(f"  {'':26} {'fusedres':>10} {reference:>12}")
    for name, (err, own) in errors.items():
        ok = err <= max(1e-4, 3 * own)  # as accurate as torchvision's own rounding
        failed += not ok
        print(f"  {name:26} {err:10.2e} {own:12.2e}{'' if ok else '  FAILED'}")
    if failed:
        print(f"{failed} model check(s) FAILED")
        return 1
    names = args.providers
    print(f"\nbenchmark: {args.arch}, batch {args.batch}, {args.size}x{args.size}, "
          f"{str(dtype)[6:]}, channels_last, {device} (median of {args.iters} steps)")
    results = benchmark.run([args.arch], names=names, batch=args.batch, size=args.size,
                            device=device, dtype=dtype, iters=args.iters)
    print(benchmark.markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
