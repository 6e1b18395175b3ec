"""The mutation catalog of tools/mutate.py: plausible bugs, one per entry, each with the tests
that should catch it.

A mutation replaces `old` (which must occur exactly once in `path`) by `new`. `equivalent`,
when set, argues why the change cannot be observed (a survivor that is not a gap).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    bug: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    equivalent: str | None = None


# Test selections (files; pytest runs them with -x -m "not slow").
OPS = ["tests/test_batch_norm.py", "tests/test_properties.py", "tests/test_boundaries.py"]
ADD = ["tests/test_add_relu.py", "tests/test_properties.py", "tests/test_boundaries.py"]
CONV = ["tests/test_conv_bias_act.py", "tests/test_conv_triton.py", "tests/test_boundaries.py"]
MODELS = ["tests/test_models.py", "tests/test_dropin.py", "tests/test_batch_norm.py"]
BAD = ["tests/test_bad_input.py", "tests/test_errors.py"]
SYNC = ["tests/test_distributed.py"]
LAUNCH = ["tests/test_triton_launch.py", "tests/test_conv_triton.py"]
ADD_BN = ["tests/test_add_batch_norm.py", "tests/test_cost_counting.py"]
PREACT = ["tests/test_preact.py"]

CATALOG = [
    # ---- fusedres/ (Python) ----------------------------------------------------------------
    Mutation("dual-eps-as-residual-eps", "fusedres/functional.py",
             "dual form: eps passed as residual_eps to the training kernel",
             "float(eps), float(residual_eps), relu)", "float(eps), float(eps), relu)",
             OPS),
    Mutation("dual-residual-momentum", "fusedres/functional.py",
             "dual form: residual running statistics updated with the main momentum factor",
             "residual_var, count, residual_factor)", "residual_var, count, factor)", OPS),
    Mutation("dual-residual-invstd-eps", "kernels/batch_norm_train.py",
             "Triton dual form: the shortcut BN's coefficients (and invstd) computed with eps",
             "residual, (residual_weight, residual_bias, residual_eps))",
             "residual, (residual_weight, residual_bias, eps))", OPS),
    Mutation("dual-eval-residual-eps", "fusedres/functional.py",
             "dual form, eval: the shortcut BN normalised with the main eps",
             "residual_bias, residual_eps)", "residual_bias, eps)", OPS),
    Mutation("add-bn-backward-drops-sum-grad", "fusedres/_ops.py",
             "add + BN + ReLU backward: the sum's own gradient (the next shortcut's) is lost",
             "mask_coefficients=(scale, shift), extra_grad=grad_sum)",
             "mask_coefficients=(scale, shift), extra_grad=None)", ADD_BN),
    Mutation("add-bn-sum-grad-added-twice", "fusedres/_ops.py",
             "add + BN + ReLU backward: the sum's own gradient added by the kernel and again",
             "        grad_total if need[0] else None,",
             "        grad_total + grad_sum if need[0] and grad_sum is not None else grad_total"
             " if need[0] else None,", ADD_BN),
    Mutation("preact-chain-ignores-block-hooks", "fusedres/preact.py",
             "the chained blocks run although a block has a hook (it never fires)",
             "if type(block) not in _CHAINABLE or _hooked(block):",
             "if type(block) not in _CHAINABLE:", PREACT),
    Mutation("preact-chain-sync-bn", "fusedres/preact.py",
             "a SyncBatchNorm after an add normalised with the local batch's statistics",
             "return not uses_sync(bn) and x.dtype", "return x.dtype", SYNC),
    Mutation("block-eps-ignored", "fusedres/nn.py",
             "blocks ignore the BN module's eps (hard-coded 1e-5), training and eval",
             "momentum=bn.momentum, eps=bn.eps,", "momentum=bn.momentum, eps=1e-5,", MODELS),
    Mutation("block-eval-eps-ignored", "fusedres/nn.py",
             "blocks ignore eps in eval (FrozenBatchNorm2d and eval BN)",
             "training=False, momentum=0.0, eps=bn.eps,", "training=False, momentum=0.0, eps=1e-5,",
             MODELS),
    Mutation("block-momentum-ignored", "fusedres/nn.py",
             "blocks ignore the BN module's momentum",
             "momentum=bn.momentum, eps=bn.eps,", "momentum=0.1, eps=bn.eps,", MODELS),
    Mutation("reference-cma-biased-var", "fusedres/reference.py",
             "reference backend, momentum=None: running_var updated with the biased variance",
             "correction=1)", "correction=0)", OPS),
    Mutation("fused-conv2d-unbiased-var", "fusedres/reference.py",
             "fused_conv2d (reference / cpp) returns the unbiased variance",
             "dim=(0, 2, 3), correction=0)", "dim=(0, 2, 3), correction=1)", CONV),
    Mutation("running-var-biased", "fusedres/functional.py",
             "running_var updated with the biased variance",
             "torch.mul(var, count / max(count - 1, 1),", "torch.mul(var, 1.0,", OPS),
    Mutation("cma-factor-off-by-one", "fusedres/functional.py",
             "momentum=None: factor 1/(n+1) after counting the batch",
             "return 1.0 / num_batches_tracked.to(dtype)",
             "return 1.0 / (num_batches_tracked.to(dtype) + 1)", OPS),
    Mutation("counter-not-incremented", "fusedres/functional.py",
             "num_batches_tracked not counted",
             "num_batches_tracked.add_(1)", "num_batches_tracked.add_(0)", OPS),
    Mutation("eval-eps-ignored", "fusedres/functional.py",
             "eval coefficients use eps=1e-5 whatever eps is given",
             "scale_shift(running_var.to(acc), weight, bias, eps)",
             "scale_shift(running_var.to(acc), weight, bias, 1e-5)",
             OPS),
    Mutation("eval-grad-scale", "fusedres/_ops.py",
             "eval backward: weight gradient is sum(g) instead of sum(g * xhat)",
             "dscale = sum_gx if need[2] else None", "dscale = sum_g if need[2] else None", OPS),
    Mutation("train-grad-weight-bias-swapped", "fusedres/_ops.py",
             "training backward: weight and bias gradients swapped",
             "return grad_input, sum_dy_xhat, sum_dy", "return grad_input, sum_dy, sum_dy_xhat", OPS),
    Mutation("relu-mask-dropped", "fusedres/_ops.py",
             "backward of the eval form ignores the ReLU mask",
             "return _threshold_backward(grad, out, 0) if relu else grad", "return grad", OPS),
    Mutation("residual-grad-unmasked", "fusedres/_ops.py",
             "training backward: the residual's gradient is grad_out, not the masked gradient",
             "grad_residual = masked_grad if write_grad else grad", "grad_residual = grad", OPS),
    Mutation("dual-second-bn-unmasked", "fusedres/_ops.py",
             "dual backward: the shortcut BN's passes read the unmasked gradient",
             "write_grad=ctx.relu)", "write_grad=False)", OPS),
    Mutation("train-mask-recomputed-with-residual", "fusedres/_ops.py",
             "training backward recomputes the ReLU mask without the residual's term",
             "masked_by = out if relu and ctx.has_residual else None\n    coefficients = (scale, "
             "shift) if relu and not ctx.has_residual else (None, None)",
             "masked_by = None\n    coefficients = (scale, shift) if relu else (None, None)", OPS),
    Mutation("conv-relu-mask-dropped", "fusedres/_ops.py",
             "folded conv backward ignores the ReLU mask",
             "g = _threshold_backward(grad, out, 0)\n    grad_input, grad_weight",
             "g = grad\n    grad_input, grad_weight", CONV),
    Mutation("conv2d-prologue-grad-unscaled", "fusedres/_ops.py",
             "fused_conv2d backward: the prologue's input gradient not multiplied by the scale",
             "(grad_pre * broadcast_channel(scale, input)).to(input.dtype)",
             "grad_pre.to(input.dtype)", CONV),
    Mutation("dual-fusable-cma-shortcut", "fusedres/nn.py",
             "dual op used for a cumulative-average shortcut BN under a momentum main BN",
             "return not training or ds_bn.momentum is not None or bn.momentum is None",
             "return True", MODELS),
    Mutation("shortcut-relu", "fusedres/nn.py",
             "the shortcut conv + BN gets a ReLU",
             "return conv_bn_act(identity, conv, bn, relu=False)",
             "return conv_bn_act(identity, conv, bn, relu=True)", MODELS),
    Mutation("fold-bn-eps-ignored", "fusedres/convert.py",
             "fold_bn folds with eps=1e-5 whatever the BN's eps",
             "bn.running_mean, bn.running_var, bn.eps,", "bn.running_mean, bn.running_var, 1e-5,",
             MODELS),
    Mutation("one-value-per-channel-check", "fusedres/functional.py",
             "training accepts one value per channel (NaN statistics instead of an error)",
             "input.numel() // input.shape[1] <= 1:\n        raise ValueError(\n            f\"Expected",
             "input.numel() // input.shape[1] < 1:\n        raise ValueError(\n            f\"Expected",
             BAD),
    Mutation("sync-cma-factor", "fusedres/sync_batchnorm.py",
             "SyncBatchNorm fused path: momentum=None factor from the uncounted batch",
             "1.0 / float(bn.num_batches_tracked)", "1.0 / (float(bn.num_batches_tracked) + 1)", SYNC),

    # ---- kernels/ (Triton, under the interpreter) ------------------------------------------
    Mutation("triton-input-grad-first-block", "kernels/batch_norm_backward.py",
             "input-grad kernel reads the first channel block's weights (wrong for C > 32)",
             "k = invstd * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)",
             "k = invstd * tl.load(weight_ptr + cols % BLOCK_C, mask=col_ok, other=0.0).to(ACC)",
             OPS),
    Mutation("triton-reduce-merge-skips-first", "kernels/batch_norm_backward.py",
             "backward reduce merge drops the first program's partial sums",
             "ok = (p < programs)[:, None] & col_ok[None, :]",
             "ok = ((p > 0) & (p < programs))[:, None] & col_ok[None, :]", OPS),
    Mutation("triton-reduce-no-invstd", "kernels/batch_norm_backward.py",
             "sum_dy_xhat not scaled by invstd",
             "sum_gx * invstd, mask=col_ok)", "sum_gx, mask=col_ok)", OPS),
    Mutation("triton-stats-unbiased", "kernels/batch_norm_stats.py",
             "batch statistics return the unbiased variance",
             "m2 / tl.where(n > 0, n, 1.0), 0.0)", "m2 / tl.where(n > 1, n - 1, 1.0), 0.0)", OPS),
    Mutation("triton-chan-merge-weight", "kernels/batch_norm_stats.py",
             "Chan merge: the between-means term lacks n_a",
             "delta * delta * n_a * w_b", "delta * delta * w_b", OPS),
    Mutation("triton-stats-past-end", "kernels/batch_norm_stats.py",
             "a statistics program walks past its share of rows (the next program's rows count twice)",
             "end = tl.minimum(start + rows_per_program, rows)",
             "end = tl.minimum(start + 2 * rows_per_program, rows)", OPS),
    Mutation("triton-residual-shift-dropped", "kernels/batch_norm_apply.py",
             "normalize kernel drops the residual BN's shift (dual form)",
             "y += (z - rm[None, :]) * rs[None, :] + rb[None, :]",
             "y += (z - rm[None, :]) * rs[None, :]", OPS),
    Mutation("triton-relu-drops-nan", "kernels/batch_norm_apply.py",
             "ReLU written as max(y, 0): NaN becomes 0 on a GPU (not in the interpreter)",
             "y = tl.where(y < 0.0, 0.0, y)", "y = tl.where(y > 0.0, y, 0.0)", OPS + BAD),
    Mutation("triton-add-sum-truncated", "kernels/_common.py",
             "Triton add: the interpreter's truncating bfloat16 conversion left as it is",
             "if _ROUND_BY_BITS and DTYPE == tl.bfloat16:", "if False:", ADD_BN),
    Mutation("triton-add-shift-of-input", "kernels/batch_norm_stats.py",
             "Triton add statistics: the merge shifts back by x's first value, not the sum's",
             "mean += channel_shift(x_ptr, z_ptr, cols, col_ok, inner, ADD, CHANNELS_LAST, ACC)",
             "mean += channel_shift(x_ptr, z_ptr, cols, col_ok, inner, False, CHANNELS_LAST, ACC)",
             ADD_BN),
    Mutation("triton-input-grad-drops-extra", "kernels/batch_norm_backward.py",
             "Triton input gradient: the extra gradient is not added",
             "        dx += tl.load(extra_ptr + offsets, mask=ok, other=0.0).to(ACC)",
             "        dx += 0.0", ADD_BN),
    Mutation("triton-recomputed-mask-unrounded", "kernels/batch_norm_backward.py",
             "recomputed ReLU mask tests the float value, not the output as stored (bf16 zeros)",
             "y = v.to(dy_ptr.dtype.element_ty).to(ACC)", "y = v", OPS),
    Mutation("triton-train-eps-dropped", "kernels/batch_norm_stats.py",
             "training scale computed without eps (the statistics' merge kernel writes it)",
             "           *float_pair(eps),",
             "           0.0, 0.0,", OPS),
    Mutation("triton-conv-padding-shifted", "kernels/fused_conv2d.py",
             "conv prologue applied to the zero padding (padding becomes shift[c])",
             "a = tl.where(a_ok, a_f, 0.0).to(x_ptr.dtype.element_ty)",
             "a = a_f.to(x_ptr.dtype.element_ty)", CONV),
    Mutation("triton-conv-stats-full-tile", "kernels/fused_conv2d.py",
             "conv statistics count a partial last tile as full",
             "count = tl.sum(m_ok.to(tl.float32), axis=0)",
             "count = tl.sum((m_ok | True).to(tl.float32), axis=0)",
             CONV),
    Mutation("triton-conv-prologue-relu-maximum", "kernels/fused_conv2d.py",
             "conv prologue ReLU as tl.maximum (NaN becomes 0)",
             "a_f = tl.where(a_f < 0.0, 0.0, a_f)", "a_f = tl.maximum(a_f, 0.0)", LAUNCH),
    Mutation("triton-conv-bias-as-given", "kernels/fused_conv2d.py",
             "conv bias passed to the kernel as given (a strided bias reads the wrong channels)",
             "per_channel(bias) if bias is not None", "bias if bias is not None", LAUNCH),
    Mutation("triton-conv-stats-unshifted", "kernels/fused_conv2d.py",
             "conv statistics partials taken about 0 instead of the tile's first value",
             "first = tl.where(tl.abs(first) < float(\"inf\"), first, 0.0)", "first = first * 0.0",
             LAUNCH),
    Mutation("triton-conv-stats-best-config", "kernels/fused_conv2d.py",
             "conv statistics count the tiles of the autotuner's shared best_config",
             "tiles = triton.cdiv(M, launched[\"BLOCK_M\"])",
             "tiles = triton.cdiv(M, getattr(_conv2d_kernel, \"best_config\", None).kwargs"
             "[\"BLOCK_M\"] if getattr(_conv2d_kernel, \"best_config\", None) else "
             "launched[\"BLOCK_M\"])", LAUNCH),
    Mutation("triton-grid-channels-on-y", "kernels/batch_norm_stats.py",
             "statistics grid with the channel blocks on axis 1 (65535 at most)",
             "lambda meta: (triton.cdiv(C, meta[\"BLOCK_C\"]), programs)",
             "lambda meta: (programs, triton.cdiv(C, meta[\"BLOCK_C\"]))", LAUNCH),

    # ---- csrc/ (C++, one rebuild each) -----------------------------------------------------
    Mutation("cpp-sums-last-block-only", "csrc/cpu/loops.h",
             "channels_last per-channel sums count only the last 256-row block",
             "for (int64_t b = 0; b < blocks; ++b) {",
             "for (int64_t b = blocks - 1; b < blocks; ++b) {",
             OPS),
    Mutation("cpp-stats-unbiased", "csrc/cpu/batch_norm_stats.cpp",
             "channels-first batch statistics return the unbiased variance",
             "total.merge(part);\n      }\n      mean[c] = static_cast<acc_t>(total.mean);\n"
             "      var[c] = static_cast<acc_t>(total.m2 / total.count);",
             "total.merge(part);\n      }\n      mean[c] = static_cast<acc_t>(total.mean);\n"
             "      var[c] = static_cast<acc_t>(total.m2 / (total.count - 1));", OPS),
    Mutation("cpp-proj-no-invstd", "csrc/cpu/batch_norm_backward.cpp",
             "input gradient's projection term misses one invstd factor",
             "proj[c] = sum_dy_xhat.const_data_ptr<acc_t>()[c] * inv_m * is;",
             "proj[c] = sum_dy_xhat.const_data_ptr<acc_t>()[c] * inv_m;", OPS),
    Mutation("cpp-recomputed-mask-unrounded", "csrc/cpu/batch_norm_backward.cpp",
             "recomputed ReLU mask tests the float value, not the output as stored (bf16 zeros)",
             "return value <= acc_t(kRoundsToZero<scalar_t>);",
             "return value <= acc_t(0);", OPS),
    Mutation("cpp-relu-drops-nan", "csrc/cpu/loops.h",
             "ReLU written as value > 0 ? value : 0 (NaN becomes 0)",
             "value = value < acc_t(0) ? acc_t(0) : value;", "value = value > acc_t(0) ? value : acc_t(0);",
             OPS + BAD),
    Mutation("cpp-dual-residual-eps", "csrc/batch_norm_train.h",
             "dual training kernel normalises the residual with the main eps",
             "statistics<stats>(z, residual_weight, residual_bias, residual_eps);",
             "statistics<stats>(z, residual_weight, residual_bias, eps);", OPS),

    # ---- csrc/cuda/ (CUDA, run in the emulation build; one rebuild each) --------------------
    Mutation("cuda-missing-barrier", "csrc/cuda/utils.cuh",
             "tree merge reads the other threads' shared memory without a barrier",
             "  for (; half > 0; half /= 2) {\n    __syncthreads();\n",
             "  for (; half > 0; half /= 2) {\n", OPS),
    Mutation("cuda-misplaced-barrier", "csrc/cuda/utils.cuh",
             "tree merge: each level's barrier after its merge instead of before (the first "
             "level reads before the others have written)",
             "  for (; half > 0; half /= 2) {\n"
             "    __syncthreads();\n"
             "    if (index < half && index + half < count) {\n"
             "      const acc_t* theirs = mine + half * lanes;\n"
             "#pragma unroll 1\n"
             "      for (int j = 0; j < N; ++j) Op::merge(mine + j * K * plane, theirs + j * K * plane, "
             "plane);\n"
             "    }\n"
             "  }\n",
             "  for (; half > 0; half /= 2) {\n"
             "    if (index < half && index + half < count) {\n"
             "      const acc_t* theirs = mine + half * lanes;\n"
             "#pragma unroll 1\n"
             "      for (int j = 0; j < N; ++j) Op::merge(mine + j * K * plane, theirs + j * K * plane, "
             "plane);\n"
             "    }\n"
             "    __syncthreads();\n"
             "  }\n", OPS),
    Mutation("cuda-merge-pass-drops-loads", "csrc/cuda/utils.cuh",
             "partials merge: a pass merges its loads one level deep only (half are lost)",
             "Op::merge(part[i], part[i + s]);", "if (s == 1) Op::merge(part[i], part[i + s]);",
             OPS + ["tests/test_cuda_merge.py"]),
    Mutation("cuda-grid-floor", "csrc/cuda/utils.cuh",
             "channels_last grid rounds the channel blocks down (the last channels get no block)",
             "const int64_t gx = ceil_div(vectors, bx);", "const int64_t gx = vectors / bx;", OPS),
    Mutation("cuda-elementwise-grid-floor", "csrc/cuda/utils.cuh",
             "elementwise grid rounds the blocks down",
             "ceil_div(units, kBlockThreads)", "units / kBlockThreads", OPS,
             equivalent="the kernels loop over their work with a grid stride and the grid is "
                        "at least one block, so any grid size covers every element"),
    Mutation("cuda-add-stats-of-input", "csrc/cuda/batch_norm_stats.cu",
             "CUDA add statistics: the sum is written but the statistics are of x",
             "    store_vec(sum + offset, v);\n  }\n  return v;",
             "    store_vec(sum + offset, v);\n  }\n  return load_vec<scalar_t, VEC>(x + offset);",
             ADD_BN),
    Mutation("cuda-input-grad-drops-extra", "csrc/cuda/batch_norm_backward.cu",
             "CUDA input gradient: the extra gradient is read but not added",
             "for (int j = 0; j < VEC; ++j) e[j] = static_cast<acc_t>(v.v[j]);",
             "for (int j = 0; j < VEC; ++j) e[j] = acc_t(0) * static_cast<acc_t>(v.v[j]);",
             ADD_BN),
    Mutation("cpp-add-stats-of-input", "csrc/cpu/batch_norm_stats.cpp",
             "CPU add statistics (NCHW): the sum is written but the statistics are of x",
             "const scalar_t* run = (z != nullptr ? sum_out : x) + first;",
             "const scalar_t* run = x + first;", ADD_BN),
    Mutation("cuda-train-coefficients-eps-dropped", "csrc/cuda/batch_norm_stats.cu",
             "the merge's epilogue computes invstd without eps",
             "const acc_t is = acc_t(1) / sqrt_rn(load(var + c) + eps);",
             "const acc_t is = acc_t(1) / sqrt_rn(load(var + c));", OPS),
    Mutation("cuda-train-shift-ignores-bias", "csrc/cuda/batch_norm_stats.cu",
             "the merge's epilogue writes a shift of 0 whatever the bias",
             "store(shift + c, bias.get(c, acc_t(0)));",
             "store(shift + c, acc_t(0));", OPS),
    Mutation("cuda-chan-merge-weight", "csrc/cuda/batch_norm_stats.cu",
             "Chan merge of block partials: the between-means term lacks the count",
             "delta * delta * a[0] * wb", "delta * delta * wb", OPS),
    Mutation("cuda-recomputed-mask-unrounded", "csrc/cuda/batch_norm_backward.cu",
             "recomputed ReLU mask tests the float value, not the output as stored (bf16 zeros)",
             "pass = !(static_cast<acc_t>(static_cast<scalar_t>(value)) <= acc_t(0));",
             "pass = !(value <= acc_t(0));", OPS),
    Mutation("cuda-reduce-writes-unmasked", "csrc/cuda/batch_norm_backward.cu",
             "the reduce writes grad_out where it should write the masked gradient",
             "for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(g[j]);",
             "for (int j = 0; j < VEC; ++j) out.v[j] = a.dy[i + j];", OPS),
    Mutation("cpp-fold-bias-unscaled", "csrc/composite/fold_conv_bn.cpp",
             "folded bias: (bias - mean) not multiplied by the scale",
             "bias = bias.mul(scale);", "bias = bias;", CONV + MODELS),
]
