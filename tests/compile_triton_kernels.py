"""Compiles the Triton kernels of fusedres.kernels for real GPUs, without one, down to a cubin.

1. Every config of every autotuned kernel (the tuning space: on a GPU any of them may win), for
   sm_90 and sm_80, with the specialisations that the arguments of a ResNet-50 bfloat16 step
   get: the launchers run on CPU tensors of ResNet-50's shapes with the kernel runs replaced by
   a record of their arguments (kernels/_common._run), and Triton's own binder specialises each
   recorded launch (integers divisible by 16 or equal to 1, 16-byte aligned pointers) as a GPU
   launch would. The BN ops in channels_last (training forward and backward of every form,
   eval), the folded convolutions of ResNet-50 inference.
2. The variants the launchers can also produce (the BN ops in NCHW at ResNet-50's shapes,
   float64 accumulation, float32, fused_conv2d's prologue and statistics, grouped and dilated
   convolutions), with the fixed config, for sm_90.

The interpreter tests check what the kernels compute; this checks that they compile, and that
the BN tile kernels' PTX has no 64-bit division or remainder (NCHW offsets divide by H * W, a
compile-time constant: kernels/_common.tile_offsets). Run as a script with TRITON_INTERPRET
unset (tests/test_triton_compile.py does, in shards).
Usage: compile_triton_kernels.py [--shard I/N] [--list]
"""
import argparse
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from fusedres.kernels import _common, fused_conv2d

ARCHS = (90, 80)
BF16 = torch.bfloat16
# Kernels whose every element's offset goes through tile_offsets: no 64-bit div / rem in them.
NO_DIVISION = {"_normalize_kernel", "_stats_partial_kernel", "_reduce_partial_kernel",
               "_input_grad_kernel"}


def record(workload):
    """[(kernel, args, kwargs)] of the launches `workload()` makes (none of them runs)."""
    launches = []

    def run(kernel, config, grid, args, kwargs):
        launches.append((kernel, args, kwargs))
        config = config or getattr(kernel, "fixed_config", None)
        grid({**kwargs, **(config.kwargs if config is not None else {})})  # the launch's meta

    saved = _common._run
    _common._run = run
    try:
        workload()
    finally:
        _common._run = saved
    return launches


def bn_workload(dtype, layouts=("channels_last", "nchw"), batch=16):
    """Every BN op form at ResNet-50's (C, H*W) pairs."""
    ops = torch.ops.fusedres_triton

    def work():
        for C, size in [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14),
                        (1024, 14), (512, 7), (2048, 7)]:
            for layout in layouts:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = torch.empty(batch, C, size, size, dtype=dtype).contiguous(memory_format=fmt)
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                w, b = torch.ones(C, dtype=acc), torch.zeros(C, dtype=acc)
                out, mean, var, invstd, scale, shift = ops.batch_norm_act_train(
                    x, w, b, None, 1e-5, True)
                ops.batch_norm_act_train(x, w, b, x, 1e-5, True)
                ops.dual_batch_norm_act_train(x, w, b, x, w, b, 1e-5, 1e-5, True)
                ops.batch_norm_apply(x, mean, w, b, None, None, None, None, True)
                for buffers in (mean, mean.to(BF16)):  # (a bfloat16 model's buffers too)
                    ops.batch_norm_coefficients(x, buffers, buffers, w, b, 1e-5)
                for y, mask in ((out, ()), (None, ()), (None, (scale, shift))):
                    s = ops.batch_norm_backward_reduce(x, y, x, mean, invstd, y is not None,
                                                       *mask)
                    ops.batch_norm_backward_input(x, y, x, mean, invstd, w, *s[:2], *mask)
                for y, grads in ((out, (None, None)), (None, (BF16, BF16))):
                    ops.dual_batch_norm_backward(x, y, x, mean, invstd, w, x, mean, invstd, w,
                                                 *grads)
                ops.add_relu(x, x)
    return work


def resnet50_convs():
    """(input shape, weight shape, stride, padding, role) of each convolution of ResNet-50 at
    224x224; role: how the folded model fuses it."""
    import torchvision
    model = torchvision.models.resnet50().to("meta")
    convs = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            role = ("add_relu" if name.endswith("conv3") else
                    "bias" if "downsample" in name else "relu")
            m.register_forward_hook(lambda m, i, o, role=role: convs.append(
                (tuple(i[0].shape), tuple(m.weight.shape), list(m.stride), list(m.padding), role)))
    model(torch.empty(16, 3, 224, 224, device="meta"))
    return convs


def conv_workload(dtype, batch=16):
    def work():
        for shape, wshape, stride, padding, role in resnet50_convs():
            shape = (batch, *shape[1:])
            x = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.empty(wshape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            b = torch.zeros(wshape[0])
            out = fused_conv2d.fused_conv2d(x, w, b, None, None, None, stride, padding, [1, 1], 1, False,
                                role != "bias", False)[0]
            if role == "add_relu":
                fused_conv2d.fused_conv2d(x, w, b, out, None, None, stride, padding, [1, 1], 1, False, True,
                              False)
    return work


def variant_workload():
    """The other dtypes and flags, on small shapes (fixed config only)."""
    def work():
        bn_workload(BF16, layouts=("nchw",))()
        bn_workload(torch.float64, batch=2)()
        bn_workload(torch.float32, layouts=("nchw",), batch=2)()
        x = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        w = torch.empty(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
        s = torch.ones(16)
        for dtype in (BF16, torch.float32):
            xd, wd = x.to(dtype), w.to(dtype)
            fused_conv2d.fused_conv2d(xd, wd, None, None, s, s, [1, 1], [1, 1], [1, 1], 1, True, False, True)
            res = torch.empty(2, 32, 8, 8, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            fused_conv2d.fused_conv2d(xd, wd, s.repeat(2), res, s, s, [1, 1], [1, 1], [1, 1], 1, True, True,
                          True)
            fused_conv2d.fused_conv2d(xd, wd[:, :4], None, None, None, None, [2, 1], [1, 0], [2, 2], 4, False,
                          True, False)
    return work


def specialise(kernel, args, kwargs, config, arch):
    """What JITFunction.run would compile for this launch on `arch`: (source, options)."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**kwargs, **(config.all_kwargs() if config is not None else {})}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                         options)
    return ASTSource(fn, signature, constexprs, attrs), options


def jobs():
    """Unique (kernel, args, kwargs, config, arch) to compile."""
    seen = set()
    tuned = record(bn_workload(BF16, layouts=("channels_last",))) + record(conv_workload(BF16))
    for launches, every in [(tuned, True), (record(variant_workload()), False)]:
        for kernel, args, kwargs in launches:
            configs = [None]
            if hasattr(kernel, "configs"):
                configs = kernel.configs if every else [kernel.fixed_config]
            for config in configs:
                for arch in (ARCHS if every else ARCHS[:1]):
                    src, options = specialise(kernel, args, kwargs, config, arch)
                    key = (src.hash(), str(options), arch)
                    if key not in seen:
                        seen.add(key)
                        yield kernel, args, kwargs, config, arch


def describe(kernel, config, arch):
    name = (kernel.fn if hasattr(kernel, "configs") else kernel).__name__
    return f"{name} {config.kwargs if config is not None else ''} sm_{arch}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--list", action="store_true")
    opts = parser.parse_args()
    index, shards = map(int, opts.shard.split("/"))
    count = 0
    for i, (kernel, args, kwargs, config, arch) in enumerate(jobs()):
        if i % shards != index:
            continue
        if opts.list:
            print(describe(kernel, config, arch))
            continue
        try:
            src, options = specialise(kernel, args, kwargs, config, arch)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=options.__dict__)
        except Exception as e:  # report which kernel, config and arch failed
            print(f"FAILED {describe(kernel, config, arch)}: {type(e).__name__}: {e}")
            return 1
        name = (kernel.fn if hasattr(kernel, "configs") else kernel).__name__
        division = re.search(r"\b(?:div|rem)\.[su]64\b", compiled.asm["ptx"])
        if name in NO_DIVISION and division:
            print(f"FAILED {describe(kernel, config, arch)}: {division.group(0)} in its PTX")
            return 1
        count += 1
    print(f"compiled {count} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
