"""The Python side of every fused op, one section per op: its contract (the argument checks,
worded as the C++ TORCH_CHECKs of csrc/common.h, written with torch._check so they also run on
fake tensors), its fake kernel, and its autograd formula.

Three namespaces hold ops of the same names and schemas (the op index: csrc/fusedres.cpp):
`fusedres` (the C++ / CUDA kernels of csrc/), `fusedres_emulated` (csrc/cuda compiled for the
CPU, tests only) and `fusedres_triton` (kernels/). register(namespace) gives each op of one
namespace (NAMESPACE_OPS) its fake kernel, which checks the contract first, and its autograd;
an op missing from its namespace is an error. The Triton ops run the contract themselves
(`check`), the C++ ops their TORCH_CHECKs. The fake kernels reproduce the kernels' output
strides exactly (so torch.compile and opcheck see what runs); the backward formulas call the
fused backward kernels of the same namespace. The training ops also update the BN's running
statistics in place; torch.library gives autograd formulas to functional ops only, so those
get theirs from _register_mutating_autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch._prims_common import suggest_memory_format

from .reference import conv_output_shape

_threshold_backward = torch.ops.aten.threshold_backward.default


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of statistics and per-channel parameters: float, or double for double inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(t: torch.Tensor) -> bool:
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def conv_output_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format of a fused conv's output: the input's, decided from its strides as
    PyTorch's suggest_memory_format (common.h: prepare_conv), so N x C x 1 x 1 is NCHW."""
    return suggest_memory_format(input)


def dense(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads (common.h: dense_for_kernels): NCHW-contiguous or
    channels_last as given, anything else copied to NCHW."""
    return t if t.is_contiguous() or is_channels_last(t) else t.contiguous()


def match_layout(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """t in the memory layout of like (same shape), copying only if needed (common.h:
    match_layout)."""
    if t is None:
        return None
    if like.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def empty_like_kernel_output(x: torch.Tensor) -> torch.Tensor:
    """What the kernels allocate for an output shaped like x: like dense(x)."""
    if x.is_contiguous() or is_channels_last(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def channel_vector(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=accumulate_dtype(x.dtype))


def broadcast_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def _relu_grad(grad, out, relu):
    return _threshold_backward(grad, out, 0) if relu else grad


def _cast(grad, like):
    return None if like is None or grad is None else grad.to(like.dtype)


# ---- contracts: the checks of csrc/common.h, same wording ----------------------------------

_CPP_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                    torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                    torch.bool: "Bool", torch.float8_e4m3fn: "Float8_e4m3fn",
                    torch.complex64: "ComplexFloat",
                    torch.complex128: "ComplexDouble"}


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it (Float, BFloat16, ...)."""
    return _CPP_DTYPE_NAMES.get(dtype, str(dtype))


def _sizes(t) -> str:
    """Sizes as c10 prints them: [2, 4, 3, 3]."""
    return "[" + ", ".join(str(s) for s in t) + "]"


def check_input(x, name="input"):
    torch._check(x.dim() >= 2, lambda: f"fusedres: {name} must have shape (N, C, ...), got "
                                        f"{x.dim()} dimension(s)")
    torch._check(x.dtype.is_floating_point, lambda: f"fusedres: {name} must be a floating point "
                                                    f"tensor, got {_dtype_name(x.dtype)}")


def check_same(t, x, name):
    torch._check(t.shape == x.shape, lambda: f"fusedres: {name} must have the shape of input "
                                             f"{_sizes(x.shape)}, got {_sizes(t.shape)}")
    torch._check(t.dtype == x.dtype, lambda: f"fusedres: {name} must have the dtype of input "
                                             f"({_dtype_name(x.dtype)}), got {_dtype_name(t.dtype)}")
    torch._check(t.device == x.device,
                 lambda: f"fusedres: {name} is on {t.device} but input is on {x.device}")


def check_channel_vector(t, x, dtype, name):
    """Per-channel vectors (scale, shift, mean, ...): C values of `dtype`."""
    torch._check(t.dim() == 1 and t.shape[0] == x.shape[1],
                 lambda: f"fusedres: {name} must have shape ({x.shape[1]},), got {_sizes(t.shape)}")
    torch._check(t.dtype == dtype, lambda: f"fusedres: {name} must be {_dtype_name(dtype)}, got "
                                           f"{_dtype_name(t.dtype)}")
    torch._check(t.device == x.device,
                 lambda: f"fusedres: {name} is on {t.device} but input is on {x.device}")


def check_affine(t, x, name):
    """An optional BN weight or bias: C values of any floating dtype, on input's device."""
    if t is None:
        return
    torch._check(t.dim() == 1 and t.shape[0] == x.shape[1],
                 lambda: f"fusedres: {name} must have shape ({x.shape[1]},), got {_sizes(t.shape)}")
    torch._check(t.dtype.is_floating_point, lambda: f"fusedres: {name} must be a floating point "
                                                    f"tensor, got {_dtype_name(t.dtype)}")
    torch._check(t.device == x.device,
                 lambda: f"fusedres: {name} is on {t.device} but input is on {x.device}")


# The dtypes the kernels read and write per-channel vectors in as they are (csrc/common.h:
# is_channel_dtype); others are cast.
CHANNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_running_stats(running_mean, running_var, counter, momentum, x, prefix=""):
    """nn.BatchNorm2d's running statistics, which a training forward updates in place: both or
    neither of running_mean / running_var (C contiguous float, double, half or bfloat16 values
    on input's device: the kernels write them where they are), the counter num_batches_tracked
    (one int64 on input's device), momentum None only with the counter."""
    torch._check((running_mean is None) == (running_var is None),
                 lambda: f"fusedres: {prefix}running_mean and {prefix}running_var must both be "
                         "given or both be None")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        check_affine(t, x, prefix + name)
        if t is None:
            continue
        torch._check(t.dtype in CHANNEL_DTYPES,
                     lambda: f"fusedres: {prefix}{name} must be Float, Double, Half or BFloat16, "
                             f"got {_dtype_name(t.dtype)}")
        torch._check(t.is_contiguous(), lambda: f"fusedres: {prefix}{name} must be contiguous "
                                                "(it is updated in place)")
    if counter is not None:
        torch._check(counter.numel() == 1,
                     lambda: f"fusedres: {prefix}num_batches_tracked must have one element "
                             f"(a counter), got shape {_sizes(counter.shape)}")
        torch._check(counter.dtype == torch.int64,
                     lambda: f"fusedres: {prefix}num_batches_tracked must be Long, got "
                             f"{_dtype_name(counter.dtype)}")
        torch._check(counter.device == x.device,
                     lambda: f"fusedres: {prefix}num_batches_tracked is on {counter.device} but "
                             f"input is on {x.device}")
    torch._check(momentum is not None or running_mean is None or counter is not None,
                 lambda: f"fusedres: {prefix}momentum=None (a cumulative average) needs "
                         f"{prefix}num_batches_tracked")


def check_train_input(x, name="input"):
    """csrc/batch_norm_train.h: batch statistics need two values a channel."""
    check_input(x, name)
    torch._check(x.numel() == 0 or x.numel() // x.shape[1] > 1,
                 lambda: f"Expected more than 1 value per channel when training, got {name} size "
                         f"{_sizes(x.shape)}")


def check_conv(input, weight, bias, residual, stride, padding, dilation, groups):
    """common.h prepare_conv: the folded convolutions' operands."""
    torch._check(input.dim() == 4, lambda: f"fusedres: input must have shape (N, C, H, W), got "
                                           f"{_sizes(input.shape)}")
    torch._check(input.dtype.is_floating_point, lambda: "fusedres: input must be a floating "
                                                        f"point tensor, got {_dtype_name(input.dtype)}")
    torch._check(weight.dim() == 4, lambda: "fusedres: weight must have shape (C_out, C_in / "
                                            f"groups, kH, kW), got {_sizes(weight.shape)}")
    torch._check(weight.dtype == input.dtype,
                 lambda: f"fusedres: weight must have the dtype of input "
                         f"({_dtype_name(input.dtype)}), got {_dtype_name(weight.dtype)}")
    torch._check(weight.device == input.device,
                 lambda: f"fusedres: weight is on {weight.device} but input is on {input.device}")
    torch._check(groups > 0 and input.shape[1] == weight.shape[1] * groups,
                 lambda: f"fusedres: input has {input.shape[1]} channels but weight expects "
                         f"{weight.shape[1] * groups} (weight.size(1) * groups)")
    torch._check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
                 lambda: "fusedres: stride, padding and dilation must have 2 values each")
    for d in range(2):
        torch._check(stride[d] > 0, lambda: f"fusedres: stride must be positive, got "
                                            f"{_sizes(stride)}")
        torch._check(dilation[d] > 0, lambda: f"fusedres: dilation must be positive, got "
                                              f"{_sizes(dilation)}")
        torch._check(padding[d] >= 0, lambda: f"fusedres: padding must be non-negative, got "
                                              f"{_sizes(padding)}")
        torch._check(weight.shape[d + 2] > 0, lambda: "fusedres: weight must have a kernel of "
                                                      f"at least 1x1, got {_sizes(weight.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"fusedres: bias must have shape ({weight.shape[0]},), got "
                             f"{_sizes(bias.shape)}")
        torch._check(bias.dtype.is_floating_point, lambda: "fusedres: bias must be a floating "
                                                           f"point tensor, got {_dtype_name(bias.dtype)}")
        torch._check(bias.device == input.device,
                     lambda: f"fusedres: bias is on {bias.device} but input is on {input.device}")
    if residual is not None:
        out_size = conv_output_shape(input, weight, stride, padding, dilation)
        torch._check(list(residual.shape) == list(out_size),
                     lambda: "fusedres: residual must have the convolution's output shape "
                             f"{_sizes(out_size)}, got {_sizes(residual.shape)}")
        torch._check(residual.dtype == input.dtype,
                     lambda: f"fusedres: residual must have the dtype of input "
                             f"({_dtype_name(input.dtype)}), got {_dtype_name(residual.dtype)}")
        torch._check(residual.device == input.device,
                     lambda: f"fusedres: residual is on {residual.device} but input is on "
                             f"{input.device}")


# ---- batch_norm_stats --------------------------------------------------------------------


def check_batch_norm_stats(input):
    check_input(input)


def _fake_batch_norm_stats(input):
    return channel_vector(input), channel_vector(input)


# ---- add_batch_norm_stats ----------------------------------------------------------------


def check_add_batch_norm_stats(input, residual):
    check_input(input)
    check_same(residual, input, "residual")


def _fake_add_batch_norm_stats(input, residual):
    return empty_like_kernel_output(input), channel_vector(input), channel_vector(input)


# ---- batch_norm_apply --------------------------------------------------------------------


def check_batch_norm_apply(input, mean, scale, shift, residual, residual_mean, residual_scale,
                           residual_shift, relu):
    check_input(input)
    acc = accumulate_dtype(input.dtype)
    check_channel_vector(mean, input, acc, "mean")
    check_channel_vector(scale, input, acc, "scale")
    if shift is not None:
        check_channel_vector(shift, input, acc, "shift")
    torch._check(residual is not None or (residual_mean is None and residual_scale is None
                                          and residual_shift is None),
                 lambda: "fusedres: residual_mean / residual_scale / residual_shift given "
                         "without a residual")
    if residual is not None:
        check_same(residual, input, "residual")
    for t, name in [(residual_mean, "residual_mean"), (residual_scale, "residual_scale"),
                    (residual_shift, "residual_shift")]:
        if t is not None:
            check_channel_vector(t, input, acc, name)


def _fake_batch_norm_apply(input, mean, scale, shift, residual, residual_mean, residual_scale,
                           residual_shift, relu):
    return empty_like_kernel_output(input)


def _setup_apply(ctx, inputs, output):
    input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.save_for_backward(input, mean, scale, residual, residual_mean, residual_scale,
                          output if relu else None)


def _affine_grads(ops, g, x, mean, scale, need):
    """Gradients of (x - mean) * scale + shift for need = (x, mean, scale, shift) flags."""
    dx = dmean = dscale = dshift = None
    if need[0]:
        dx = g if scale is None else (g * broadcast_channel(scale, g)).to(x.dtype)
    if any(need[1:]):
        acc = accumulate_dtype(x.dtype)
        channels = x.shape[1]
        center = mean if mean is not None else x.new_zeros(channels, dtype=acc)
        # sum(g) and sum(g * (x - mean)): the reduce kernel with invstd 1.
        sum_g, sum_gx, *_ = ops.batch_norm_backward_reduce(
            g, None, x, center, x.new_ones(channels, dtype=acc))
        if need[1]:
            dmean = -sum_g if scale is None else -sum_g * scale
        dscale = sum_gx if need[2] else None
        dshift = sum_g if need[3] else None
    return dx, dmean, dscale, dshift


def _backward_apply(ctx, grad):
    input, mean, scale, residual, residual_mean, residual_scale, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = _relu_grad(grad, out, ctx.relu)
    grads = _affine_grads(ctx.ops, g, input, mean, scale, need[0:4])
    if ctx.has_residual:
        grads += _affine_grads(ctx.ops, g, residual, residual_mean, residual_scale, need[4:8])
    else:
        grads += (None,) * 4
    return grads + (None,)


# ---- batch_norm_coefficients -------------------------------------------------------------


def check_batch_norm_coefficients(input, running_mean, running_var, weight, bias, eps):
    check_input(input)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"),
                    (weight, "weight"), (bias, "bias")):
        check_affine(t, input, name)


def _fake_batch_norm_coefficients(input, running_mean, running_var, weight, bias, eps):
    return channel_vector(input), channel_vector(input), channel_vector(input)


def _setup_coefficients(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    ctx.dtypes = (running_mean.dtype, running_var.dtype, bias.dtype if bias is not None else None)
    # invstd, not running_var: a later training step updates running_var in place, which must
    # not invalidate this graph (F.batch_norm's eval backward survives that too).
    invstd = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        acc = output[1].dtype  # (no .to() of the same dtype: an op may not return its input)
        invstd = ((running_var if running_var.dtype == acc else running_var.to(acc)) + eps).rsqrt()
    ctx.save_for_backward(invstd, weight)


def _backward_coefficients(ctx, grad_mean, grad_scale, grad_shift):
    """scale = weight * invstd, invstd = (running_var + eps) ** -0.5: d weight = g * invstd,
    d running_var = -g * weight * invstd ** 3 / 2 (torch ops: an eval BN is rarely trained)."""
    invstd, weight = ctx.saved_tensors
    mean_dtype, var_dtype, bias_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    grad_var = grad_weight = None
    if grad_scale is not None and (need[2] or need[3]):
        if need[2]:
            w = weight.to(grad_scale.dtype) if weight is not None else 1.0
            grad_var = (grad_scale * w * invstd.pow(3) * -0.5).to(var_dtype)
        if need[3]:
            grad_weight = _cast(grad_scale * invstd, weight)
    return (None, grad_mean.to(mean_dtype) if need[1] and grad_mean is not None else None,
            grad_var, grad_weight,
            grad_shift.to(bias_dtype) if need[4] and grad_shift is not None else None, None)


# ---- batch_norm_act_train ----------------------------------------------------------------


def check_batch_norm_act_train(input, weight, bias, residual, eps, relu, running_mean=None,
                               running_var=None, num_batches_tracked=None, momentum=0.1):
    check_train_input(input)
    check_affine(weight, input, "weight")
    check_affine(bias, input, "bias")
    if residual is not None:
        check_same(residual, input, "residual")
    check_running_stats(running_mean, running_var, num_batches_tracked, momentum, input)


def _fake_batch_norm_act_train(input, weight, bias, residual, eps, relu, *_running):
    return (empty_like_kernel_output(input),) + tuple(channel_vector(input) for _ in range(5))


def _grad_dtype(weight, bias, acc):
    """The dtype the reduce writes the parameters' gradients in besides its float sums (a
    bfloat16 model's): None when that is the sums' own (no cast follows either way)."""
    params = [t.dtype for t in (weight, bias) if t is not None]
    return params[0] if params and params[0] != acc else None


def _bn_train_grads(ops, g, masked_by, input, mean, invstd, weight, bias, needs_input,
                    write_grad=False, mask_coefficients=(None, None), extra_grad=None):
    """Training BN backward: (grad_input or None, grad_weight, grad_bias in the parameters'
    dtype where the reduce could write them so (else float: _cast), and with write_grad the
    masked gradient, written by the reduce pass). The ReLU mask: from the output masked_by,
    or recomputed from input with mask_coefficients = (scale, shift). extra_grad: added to
    grad_input by the same pass."""
    grad_dtype = _grad_dtype(weight, bias, mean.dtype)
    sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias = ops.batch_norm_backward_reduce(
        g, masked_by, input, mean, invstd, write_grad, *mask_coefficients, grad_dtype)
    if grad_dtype is None:
        grad_weight, grad_bias = sum_dy_xhat, sum_dy
    if write_grad:  # the input's gradient reads the masked gradient: no second mask
        g, masked_by, mask_coefficients = masked_grad, None, (None, None)
    grad_input = None
    if needs_input:
        grad_input = ops.batch_norm_backward_input(
            g, masked_by, input, mean, invstd, weight, sum_dy, sum_dy_xhat, *mask_coefficients,
            extra_grad)
    return grad_input, grad_weight, grad_bias, masked_grad if write_grad else None


def _setup_train(ctx, inputs, output):
    input, weight, bias, residual, eps, relu = inputs[:6]
    out, mean, var, invstd, scale, shift = output
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, var, invstd, scale, shift)
    ctx.set_materialize_grads(False)  # (no zero-filled gradients for the statistics)
    # The ReLU mask: without a residual it is recomputed from input with the forward's scale
    # and shift (two passes fewer than reading the output twice); with one, from the output.
    masked_by = out if relu and ctx.has_residual else None
    coefficients = (scale, shift) if relu and not ctx.has_residual else (None, None)
    ctx.save_for_backward(input, weight, bias, masked_by, mean, invstd, *coefficients)


def _backward_train(ctx, grad, *_grad_stats):
    if grad is None:  # (grads are not materialised: nothing reached the output)
        return (None,) * 10
    input, weight, bias, out, mean, invstd, scale, shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    # With a residual before the ReLU, the residual's gradient is the masked gradient: the
    # reduce pass writes it (one write instead of a threshold_backward pass).
    write_grad = ctx.has_residual and ctx.relu
    grad_input, grad_weight, grad_bias, masked_grad = _bn_train_grads(
        ctx.ops, grad, out, input, mean, invstd, weight, bias, need[0], write_grad,
        (scale, shift))
    grad_residual = None
    if ctx.has_residual and need[3]:
        grad_residual = masked_grad if write_grad else grad
    return (
        grad_input,
        _cast(grad_weight, weight) if need[1] else None,
        _cast(grad_bias, bias) if need[2] else None,
        grad_residual,
    ) + (None,) * 6  # eps, relu, the running statistics


# ---- add_batch_norm_act_train ------------------------------------------------------------


def check_add_batch_norm_act_train(input, residual, weight, bias, eps, relu, running_mean=None,
                                   running_var=None, num_batches_tracked=None, momentum=0.1):
    check_train_input(input)
    check_same(residual, input, "residual")
    check_affine(weight, input, "weight")
    check_affine(bias, input, "bias")
    check_running_stats(running_mean, running_var, num_batches_tracked, momentum, input)


def _fake_add_batch_norm_act_train(input, residual, weight, bias, eps, relu, *_running):
    return ((empty_like_kernel_output(input), empty_like_kernel_output(input))
            + tuple(channel_vector(input) for _ in range(5)))


def _setup_add_train(ctx, inputs, output):
    input, residual, weight, bias, eps, relu = inputs[:6]
    out, total, mean, var, invstd, scale, shift = output
    ctx.mark_non_differentiable(mean, var, invstd, scale, shift)
    ctx.set_materialize_grads(False)  # (the sum's gradient is often absent)
    # The ReLU mask is recomputed from the sum with the forward's coefficients.
    coefficients = (scale, shift) if relu else (None, None)
    ctx.save_for_backward(total, weight, bias, mean, invstd, *coefficients)


def _backward_add_train(ctx, grad, grad_sum, *_grad_stats):
    total, weight, bias, mean, invstd, scale, shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    # The sum's gradient: the BN + ReLU's, plus what the sum gets directly (the next
    # shortcut), added by the input-gradient pass; input and residual both receive it.
    grad_total, grad_weight, grad_bias = grad_sum, None, None
    if grad is not None:
        grad_total, grad_weight, grad_bias, _ = _bn_train_grads(
            ctx.ops, grad, None, total, mean, invstd, weight, bias, need[0] or need[1],
            mask_coefficients=(scale, shift), extra_grad=grad_sum)
    return (
        grad_total if need[0] else None,
        grad_total if need[1] else None,
        _cast(grad_weight, weight) if need[2] else None,
        _cast(grad_bias, bias) if need[3] else None,
    ) + (None,) * 6  # eps, relu, the running statistics


# ---- dual_batch_norm_act_train -----------------------------------------------------------


def check_dual_batch_norm_act_train(input, weight, bias, residual, residual_weight,
                                    residual_bias, eps, residual_eps, relu, running_mean=None,
                                    running_var=None, num_batches_tracked=None, momentum=0.1,
                                    residual_running_mean=None, residual_running_var=None,
                                    residual_num_batches_tracked=None, residual_momentum=0.1):
    check_train_input(input)
    check_same(residual, input, "residual")
    for t, name in [(weight, "weight"), (bias, "bias"), (residual_weight, "residual_weight"),
                    (residual_bias, "residual_bias")]:
        check_affine(t, input, name)
    check_running_stats(running_mean, running_var, num_batches_tracked, momentum, input)
    check_running_stats(residual_running_mean, residual_running_var,
                        residual_num_batches_tracked, residual_momentum, input, "residual_")


def _fake_dual_batch_norm_act_train(input, weight, bias, residual, residual_weight,
                                    residual_bias, eps, residual_eps, relu, *_running):
    return (empty_like_kernel_output(input),) + tuple(channel_vector(input) for _ in range(6))


def _setup_dual(ctx, inputs, output):
    (input, weight, bias, residual, residual_weight, residual_bias, eps, residual_eps,
     relu) = inputs[:9]
    out, mean, var, invstd, residual_mean, residual_var, residual_invstd = output
    ctx.relu = relu
    ctx.mark_non_differentiable(mean, var, invstd, residual_mean, residual_var, residual_invstd)
    ctx.set_materialize_grads(False)  # (no zero-filled gradients for the statistics)
    ctx.save_for_backward(
        input, weight, bias, mean, invstd, residual, residual_weight, residual_bias,
        residual_mean, residual_invstd, out if relu else None,
    )


def _backward_dual(ctx, grad, *_grad_stats):
    if grad is None:  # (grads are not materialised: nothing reached the output)
        return (None,) * 17
    (input, weight, bias, mean, invstd, residual, residual_weight, residual_bias,
     residual_mean, residual_invstd, out) = ctx.saved_tensors
    need = ctx.needs_input_grad
    # Both BNs' gradients in one reduce and one input-gradient pass over (grad, out, input,
    # residual); the parameters' gradients in their dtype where the merge can write them so.
    gi, gr, gw, gb, grw, grb = ctx.ops.dual_batch_norm_backward(
        grad, out, input, mean, invstd, weight, residual, residual_mean, residual_invstd,
        residual_weight, _grad_dtype(weight, bias, mean.dtype),
        _grad_dtype(residual_weight, residual_bias, mean.dtype))
    return (
        gi if need[0] else None,
        _cast(gw, weight) if need[1] else None,
        _cast(gb, bias) if need[2] else None,
        gr if need[3] else None,
        _cast(grw, residual_weight) if need[4] else None,
        _cast(grb, residual_bias) if need[5] else None,
    ) + (None,) * 11  # eps, residual_eps, relu, both BNs' running statistics


# ---- batch_norm_backward_reduce ----------------------------------------------------------


def check_batch_norm_backward_reduce(grad_out, output, input, mean, invstd, write_grad=False,
                                     scale=None, shift=None, grad_dtype=None):
    check_input(input)
    check_same(grad_out, input, "grad_out")
    if output is not None:
        check_same(output, input, "output")
    acc = accumulate_dtype(input.dtype)
    check_channel_vector(mean, input, acc, "mean")
    check_channel_vector(invstd, input, acc, "invstd")
    torch._check(output is None or scale is None,
                 lambda: "fusedres: give output or scale (the ReLU mask's source), not both")
    torch._check(scale is not None or shift is None,
                 lambda: "fusedres: shift needs scale (the ReLU mask's recomputation)")
    if scale is not None:
        check_channel_vector(scale, input, acc, "scale")
    if shift is not None:
        check_channel_vector(shift, input, acc, "shift")
    _check_grad_dtype(grad_dtype, "grad_dtype")


def _check_grad_dtype(dtype, name):
    """The parameters' gradients' dtype of a backward op: a floating dtype, or None."""
    torch._check(dtype is None or dtype.is_floating_point,
                 lambda: f"fusedres: {name} must be a floating point type, got "
                         f"{_dtype_name(dtype)}")


def _fake_batch_norm_backward_reduce(grad_out, output, input, mean, invstd, write_grad=False,
                                     scale=None, shift=None, grad_dtype=None):
    masked_grad = empty_like_kernel_output(input) if write_grad else input.new_empty(0)
    grads = [mean.new_empty(mean.shape[0] if grad_dtype is not None else 0,
                            dtype=grad_dtype or mean.dtype) for _ in range(2)]
    return torch.empty_like(mean), torch.empty_like(mean), masked_grad, *grads


# ---- batch_norm_backward_input -----------------------------------------------------------


def check_batch_norm_backward_input(grad_out, output, input, mean, invstd, weight, sum_dy,
                                    sum_dy_xhat, scale=None, shift=None, extra_grad=None):
    check_batch_norm_backward_reduce(grad_out, output, input, mean, invstd, False, scale, shift)
    acc = accumulate_dtype(input.dtype)
    check_channel_vector(sum_dy, input, acc, "sum_dy")
    check_channel_vector(sum_dy_xhat, input, acc, "sum_dy_xhat")
    check_affine(weight, input, "weight")
    if extra_grad is not None:
        check_same(extra_grad, input, "extra_grad")


def _fake_batch_norm_backward_input(grad_out, output, input, mean, invstd, weight, sum_dy,
                                    sum_dy_xhat, scale=None, shift=None, extra_grad=None):
    return empty_like_kernel_output(input)


# ---- dual_batch_norm_backward --------------------------------------------------------------


def check_dual_batch_norm_backward(grad_out, output, input, mean, invstd, weight, residual,
                                   residual_mean, residual_invstd, residual_weight,
                                   grad_dtype=None, residual_grad_dtype=None):
    check_batch_norm_backward_reduce(grad_out, output, input, mean, invstd, False, None, None,
                                     grad_dtype)
    check_same(residual, input, "residual")
    acc = accumulate_dtype(input.dtype)
    check_channel_vector(residual_mean, input, acc, "residual_mean")
    check_channel_vector(residual_invstd, input, acc, "residual_invstd")
    check_affine(weight, input, "weight")
    check_affine(residual_weight, input, "residual_weight")
    _check_grad_dtype(residual_grad_dtype, "residual_grad_dtype")


def _fake_dual_batch_norm_backward(grad_out, output, input, mean, invstd, weight, residual,
                                   residual_mean, residual_invstd, residual_weight,
                                   grad_dtype=None, residual_grad_dtype=None):
    grads = [mean.new_empty(mean.shape[0], dtype=dtype or mean.dtype)
             for dtype in (grad_dtype, grad_dtype, residual_grad_dtype, residual_grad_dtype)]
    return empty_like_kernel_output(input), empty_like_kernel_output(input), *grads


# ---- add_relu ----------------------------------------------------------------------------


def check_add_relu(input, residual):
    check_input(input)
    check_same(residual, input, "residual")


def _fake_add_relu(input, residual):
    return empty_like_kernel_output(input)


def _setup_add_relu(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_add_relu(ctx, grad):
    (out,) = ctx.saved_tensors
    g = _threshold_backward(grad, out, 0)
    return g, g


# ---- conv_bias_relu, conv_bias_add_relu --------------------------------------------------


def check_conv_bias_relu(input, weight, bias, stride, padding, dilation, groups):
    check_conv(input, weight, bias, None, stride, padding, dilation, groups)


def check_conv_bias_add_relu(input, weight, bias, residual, stride, padding, dilation, groups):
    check_conv(input, weight, bias, residual, stride, padding, dilation, groups)


def _conv_output(input, weight, stride, padding, dilation):
    size = conv_output_shape(input, weight, stride, padding, dilation)
    return torch.empty(size, dtype=input.dtype, device=input.device,
                       memory_format=conv_output_format(input))


def _fake_conv_bias_relu(input, weight, bias, stride, padding, dilation, groups):
    return _conv_output(input, weight, stride, padding, dilation)


def _fake_conv_bias_add_relu(input, weight, bias, residual, stride, padding, dilation, groups):
    return _conv_output(input, weight, stride, padding, dilation)


def _setup_conv(ctx, inputs, output):
    input, weight, bias = inputs[:3]
    ctx.conv_args = tuple(inputs[-4:])  # stride, padding, dilation, groups
    ctx.has_bias = bias is not None
    ctx.has_residual = len(inputs) == 8
    ctx.save_for_backward(input, weight, bias, output)


def _backward_conv(ctx, grad):
    input, weight, bias, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need = ctx.needs_input_grad
    g = _threshold_backward(grad, out, 0)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        g, input, weight, [weight.shape[0]] if ctx.has_bias else None,
        stride, padding, dilation, False, [0, 0], groups,
        [need[0], need[1], ctx.has_bias and need[2]],
    )
    grads = [grad_input, grad_weight, _cast(grad_bias, bias) if ctx.has_bias else None]
    if ctx.has_residual:
        grads.append(g if need[3] else None)
    return tuple(grads) + (None,) * 4


# ---- fused_conv2d (Triton only) -----------------------------------------------------------


TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_fused_conv2d(input, weight, bias, residual, input_scale, input_shift, stride, padding,
                 dilation, groups, input_relu, relu, emit_stats):
    check_conv(input, weight, bias, residual, stride, padding, dilation, groups)
    torch._check(input.dtype in TRITON_CONV_DTYPES,
                 lambda: "fusedres: the Triton convolution takes Half, BFloat16 or Float input, "
                         f"got {_dtype_name(input.dtype)}")
    torch._check((input_scale is None) == (input_shift is None),
                 lambda: "fusedres: input_scale and input_shift must be given together")
    if input_scale is not None:
        check_channel_vector(input_scale, input, torch.float32, "input_scale")
        check_channel_vector(input_shift, input, torch.float32, "input_shift")


def _fake_fused_conv2d(input, weight, bias, residual, input_scale, input_shift, stride, padding,
                 dilation, groups, input_relu, relu, emit_stats):
    out = _conv_output(input, weight, stride, padding, dilation)
    stats = input.new_empty((weight.shape[0] if emit_stats else 0,), dtype=torch.float32)
    return out, stats, torch.empty_like(stats)


def _setup_fused_conv2d(ctx, inputs, output):
    (input, weight, bias, residual, input_scale, input_shift, stride, padding, dilation, groups,
     input_relu, relu, emit_stats) = inputs
    out, mean, var = output
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.flags = (bias is not None, residual is not None, input_relu, relu)
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(input, weight, bias, input_scale, input_shift, out if relu else None)


def _backward_fused_conv2d(ctx, grad, _grad_mean, _grad_var):
    """The prologue's output, relu(x * scale + shift) rounded to x's dtype, is recomputed from
    the saved input by the normalize kernel (the forward never stores it); ATen does the data
    and weight gradients; the BN backward's reduce then gives the prologue's gradients (its
    ReLU mask recomputed from x as the forward rounded it, sum(g) and sum(g * x): mean 0,
    invstd 1) and writes the masked gradient, which one more normalize pass scales: 2 + 3 + 2
    passes over x's size, no float32 temporaries."""
    input, weight, bias, scale, shift, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    has_bias, has_residual, input_relu, relu = ctx.flags
    need = ctx.needs_input_grad
    ops = ctx.ops
    g = _relu_grad(grad, out, relu)
    conv_input = input
    if scale is not None:
        zero = scale.new_zeros(scale.shape)
        conv_input = ops.batch_norm_apply(input, zero, scale, shift, None, None, None, None,
                                          input_relu)
    need_conv_input = need[0] or (scale is not None and (need[4] or need[5]))
    grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, conv_input, weight, [weight.shape[0]] if has_bias else None, stride, padding,
        dilation, False, [0, 0], groups, [need_conv_input, need[1], has_bias and need[2]])
    grad_x = grad_scale = grad_shift = None
    if scale is None:
        grad_x = grad_a
    elif need_conv_input:
        mask = (scale, shift) if input_relu else (None, None)
        sum_g, sum_gx, grad_pre, *_ = ops.batch_norm_backward_reduce(
            dense(grad_a), None, input, zero, torch.ones_like(zero), need[0], *mask)
        if need[0]:
            grad_x = ops.batch_norm_apply(grad_pre, zero, scale, None, None, None, None, None,
                                          False)
        grad_scale = sum_gx if need[4] else None
        grad_shift = sum_g if need[5] else None
    return (grad_x, grad_w, _cast(grad_b, bias) if has_bias else None,
            g if has_residual and need[3] else None, grad_scale, grad_shift) + (None,) * 7


# ---- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One op's Python side: its contract, fake kernel and (if differentiable) autograd."""
    check: Callable
    fake: Callable
    setup: Optional[Callable] = None
    backward: Optional[Callable] = None


OPS = {
    "batch_norm_stats": Op(check_batch_norm_stats, _fake_batch_norm_stats),
    "add_batch_norm_stats": Op(check_add_batch_norm_stats, _fake_add_batch_norm_stats),
    "batch_norm_apply": Op(check_batch_norm_apply, _fake_batch_norm_apply, _setup_apply,
                           _backward_apply),
    "batch_norm_coefficients": Op(check_batch_norm_coefficients, _fake_batch_norm_coefficients,
                                  _setup_coefficients, _backward_coefficients),
    "batch_norm_act_train": Op(check_batch_norm_act_train, _fake_batch_norm_act_train,
                               _setup_train, _backward_train),
    "add_batch_norm_act_train": Op(check_add_batch_norm_act_train,
                                   _fake_add_batch_norm_act_train, _setup_add_train,
                                   _backward_add_train),
    "dual_batch_norm_act_train": Op(check_dual_batch_norm_act_train,
                                    _fake_dual_batch_norm_act_train, _setup_dual, _backward_dual),
    "batch_norm_backward_reduce": Op(check_batch_norm_backward_reduce,
                                     _fake_batch_norm_backward_reduce),
    "batch_norm_backward_input": Op(check_batch_norm_backward_input,
                                    _fake_batch_norm_backward_input),
    "dual_batch_norm_backward": Op(check_dual_batch_norm_backward,
                                   _fake_dual_batch_norm_backward),
    "add_relu": Op(check_add_relu, _fake_add_relu, _setup_add_relu, _backward_add_relu),
    "conv_bias_relu": Op(check_conv_bias_relu, _fake_conv_bias_relu, _setup_conv, _backward_conv),
    "conv_bias_add_relu": Op(check_conv_bias_add_relu, _fake_conv_bias_add_relu, _setup_conv,
                             _backward_conv),
    "fused_conv2d": Op(check_fused_conv2d, _fake_fused_conv2d, _setup_fused_conv2d,
                         _backward_fused_conv2d),
}

_BN_OPS = ["batch_norm_stats", "add_batch_norm_stats", "batch_norm_apply",
           "batch_norm_coefficients", "batch_norm_act_train", "add_batch_norm_act_train",
           "dual_batch_norm_act_train", "batch_norm_backward_reduce", "batch_norm_backward_input",
           "dual_batch_norm_backward", "add_relu"]
# The ops each namespace must define (fold_conv_bn, a CompositeImplicitAutograd C++ op, needs
# neither a fake kernel nor autograd).
NAMESPACE_OPS = {
    "fusedres": _BN_OPS + ["conv_bias_relu", "conv_bias_add_relu"],
    "fusedres_emulated": _BN_OPS + ["conv_bias_relu", "conv_bias_add_relu"],
    "fusedres_triton": _BN_OPS + ["fused_conv2d"],
}


def check(name: str, *args) -> None:
    """Runs op `name`'s contract on its arguments (the Triton ops call it first)."""
    OPS[name].check(*args)


_LIBRARIES: dict = {}  # namespace -> the torch.library.Library of our own registrations


def _register_mutating_autograd(namespace: str, name: str, setup, backward) -> None:
    """torch.library.register_autograd for an op that also updates buffers in place (the
    training BNs' running statistics), which torch.library refuses for every mutating op: the
    same autograd.Function around the op below autograd, and, as for torch.library.custom_op's
    mutating ops, an ADInplaceOrView kernel that bumps the buffers' versions. The buffers are
    not differentiated (the kernel refuses one that requires grad)."""
    overload = getattr(getattr(torch.ops, namespace), name).default
    schema = overload._schema
    mutated = [i for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    defaults = [a.default_value for a in schema.arguments]
    lib = _LIBRARIES.setdefault(namespace, torch.library.Library(namespace, "IMPL"))

    def below(keyset, after, args):
        return overload.redispatch(keyset & after, *args)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args_and_keyset):
            *args, keyset = args_and_keyset
            with torch._C._AutoDispatchBelowAutograd():
                output = below(keyset, torch._C._after_autograd_keyset, args)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            need = ctx.needs_input_grad
            ctx.needs_input_grad = need[:-1]
            try:
                return tuple(backward(ctx, *grads)) + (None,)
            finally:
                ctx.needs_input_grad = need

    def autograd_kernel(keyset, *args):
        args = args + tuple(defaults[len(args):])  # (the dispatcher drops trailing defaults)
        for i in mutated:
            if args[i] is not None and args[i].requires_grad:
                raise RuntimeError(f"fusedres: {namespace}::{name} updates "
                                   f"{schema.arguments[i].name} in place; it must not require "
                                   "grad")
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in args):
            return Function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return below(keyset, torch._C._after_autograd_keyset, args)

    def inplace_or_view_kernel(keyset, *args):
        for i in mutated:
            if i < len(args) and args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return below(keyset, torch._C._after_ADInplaceOrView_keyset, args)

    lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    lib.impl(name, inplace_or_view_kernel, "ADInplaceOrView", with_keyset=True)


def register(namespace: str) -> None:
    """Registers the fake kernel (contract first) and autograd of every op of `namespace`."""
    ops = getattr(torch.ops, namespace)
    for name in NAMESPACE_OPS[namespace]:
        if not hasattr(ops, name):
            raise RuntimeError(f"fusedres: op {namespace}::{name} is missing (a stale build? "
                               "rebuild with pip install -e .)")
        op = OPS[name]

        def fake(*args, op=op):
            op.check(*args)
            return op.fake(*args)

        torch.library.register_fake(f"{namespace}::{name}", fake)
        if op.backward is None:
            continue

        def setup_context(ctx, inputs, output, setup=op.setup):
            ctx.ops = ops  # the backward kernels of the same namespace
            setup(ctx, inputs, output)

        if getattr(ops, name).default._schema.is_mutable:
            _register_mutating_autograd(namespace, name, setup_context, op.backward)
        else:
            torch.library.register_autograd(f"{namespace}::{name}", op.backward,
                                            setup_context=setup_context)
