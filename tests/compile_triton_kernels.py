"""Compiles every Triton kernel of fusedres.kernels for sm_90 (the convolution also for sm_80,
whose matrix instructions differ) without a GPU, as a launch would, down to a cubin: across
storage / accumulation dtypes and the constexpr flags the launchers use.
The interpreter tests check what the kernels compute; this checks that they compile for a
real GPU. Run as a script with TRITON_INTERPRET unset (tests/test_triton_compile.py does)."""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedres.kernels import (batch_norm_apply, batch_norm_backward, batch_norm_stats, conv2d)

DATA = {"x_ptr", "r_ptr", "y_ptr", "dy_ptr", "dx_ptr", "w_ptr", "res_ptr"}
TYPE = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}


def compile_kernel(kernel, dtype, constexprs, arch):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap an Autotuner
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (dtype if name in DATA else acc)
        else:
            signature[name] = "i32"
    values = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=values)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def jobs():
    """(kernel, dtype, constexprs, archs). bf16 stands for the 16-bit types and fp64 for the
    float64 accumulation path (fp16 / fp32 compile the same code)."""
    tile = batch_norm_stats._stats_partial_kernel.configs[0].kwargs  # BLOCK_R, BLOCK_C
    for dtype in ["bf16", "fp64"]:
        acc = TYPE["fp64" if dtype == "fp64" else "fp32"]
        for cl in [True, False]:
            yield (batch_norm_stats._stats_partial_kernel, dtype,
                   dict(CHANNELS_LAST=cl, ACC=acc, **tile), [90])
            yield (batch_norm_stats._stats_merge_kernel, dtype,
                   dict(SHIFTED=True, CHANNELS_LAST=cl, ACC=acc, BLOCK_C=32), [90])
            for masked in [True, False]:
                yield (batch_norm_backward._reduce_partial_kernel, dtype,
                       dict(MASKED=masked, CHANNELS_LAST=cl, ACC=acc, **tile), [90])
                yield (batch_norm_backward._input_grad_kernel, dtype,
                       dict(MASKED=masked, CHANNELS_LAST=cl, ACC=acc, **tile), [90])
            for residual, relu, dual in [(False, True, False), (True, True, False),
                                         (True, False, True)]:
                yield (batch_norm_apply._normalize_kernel, dtype,
                       dict(HAS_MEAN=True, HAS_SCALE=True, HAS_SHIFT=not dual,
                            HAS_RESIDUAL=residual, HAS_R_MEAN=dual, HAS_R_SCALE=dual,
                            HAS_R_SHIFT=dual, RELU=relu, CHANNELS_LAST=cl, ACC=acc, **tile), [90])
        yield (batch_norm_stats._stats_merge_kernel, dtype,  # the convolution's statistics
               dict(SHIFTED=False, CHANNELS_LAST=True, ACC=acc, BLOCK_C=32), [90])
        yield batch_norm_backward._reduce_merge_kernel, dtype, dict(ACC=acc, BLOCK_C=32), [90]
    config = conv2d._conv2d_kernel.configs[0].kwargs
    for dtype in ["bf16", "fp32"]:
        for prologue, residual, stats in [(False, False, False), (True, False, True),
                                          (False, True, False), (True, True, True)]:
            yield (conv2d._conv2d_kernel, dtype,
                   dict(STRIDED=False, HAS_PROLOGUE=prologue, PROLOGUE_RELU=True, HAS_BIAS=True,
                        HAS_RESIDUAL=residual, RELU=True, EMIT_STATS=stats,
                        IEEE=dtype == "fp32", **config), [80, 90])


def main():
    count = 0
    for kernel, dtype, constexprs, archs in jobs():
        for arch in archs:
            try:
                compile_kernel(kernel, dtype, constexprs, arch)
            except Exception as e:  # report which kernel and flags failed
                name = (kernel.fn if hasattr(kernel, "configs") else kernel).__name__
                print(f"FAILED {name} {dtype} sm_{arch} {constexprs}: {type(e).__name__}: {e}")
                return 1
            count += 1
    print(f"compiled {count} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
