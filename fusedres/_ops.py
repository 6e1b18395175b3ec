"""Fake (meta) kernels and autograd formulas of the fused ops.

Two namespaces hold ops of the same names and schemas: `fusedres` (the C++ / CUDA kernels of
csrc/, schemas in csrc/fusedres.cpp) and `fusedres_triton` (the Triton kernels of
fusedres.kernels). register(namespace) gives the ops of one of them their fake kernels and
autograd formulas, once its ops exist. The fake kernels reproduce the kernels' output strides
exactly (so torch.compile and opcheck see what runs); the backward formulas call the fused
backward kernels of the same namespace.
"""
from __future__ import annotations

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


def empty_like_kernel_output(x: torch.Tensor) -> torch.Tensor:
    """What the kernels allocate for an output shaped like x (common.h: dense_for_kernels)."""
    if x.is_contiguous() or is_channels_last(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def channel_vector(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=accumulate_dtype(x.dtype))


def broadcast_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


# ---- fake kernels ---------------------------------------------------------------------------


def _fake_batch_norm_stats(input):
    return channel_vector(input), channel_vector(input)


def _fake_batch_norm_apply(input, mean, scale, shift, residual, residual_mean, residual_scale,
                           residual_shift, relu):
    return empty_like_kernel_output(input)


def _fake_batch_norm_act_train(input, weight, bias, residual, eps, relu):
    return empty_like_kernel_output(input), channel_vector(input), channel_vector(input)


def _fake_dual_batch_norm_act_train(input, weight, bias, residual, residual_weight,
                                    residual_bias, eps, residual_eps, relu):
    return (empty_like_kernel_output(input),) + tuple(channel_vector(input) for _ in range(4))


def _fake_batch_norm_backward_reduce(grad_out, output, input, mean, invstd):
    return torch.empty_like(mean), torch.empty_like(mean)


def _fake_batch_norm_backward_input(grad_out, output, input, mean, invstd, weight, sum_dy,
                                    sum_dy_xhat):
    return empty_like_kernel_output(input)


def _fake_add_relu(input, residual):
    return empty_like_kernel_output(input)


def _conv_output(input, weight, stride, padding, dilation):
    size = conv_output_shape(input, weight, stride, padding, dilation)
    return torch.empty(size, dtype=input.dtype, device=input.device,
                       memory_format=conv_output_format(input))


def _fake_conv_bias_relu(input, weight, bias, stride, padding, dilation, groups):
    return _conv_output(input, weight, stride, padding, dilation)


def _fake_conv_bias_add_relu(input, weight, bias, residual, stride, padding, dilation, groups):
    return _conv_output(input, weight, stride, padding, dilation)


def _fake_conv2d(input, weight, bias, residual, input_scale, input_shift, stride, padding,
                 dilation, groups, input_relu, relu, emit_stats):
    out = _conv_output(input, weight, stride, padding, dilation)
    stats = input.new_empty((weight.shape[0] if emit_stats else 0,), dtype=torch.float32)
    return out, stats, torch.empty_like(stats)


# ---- autograd -------------------------------------------------------------------------------
# The ReLU mask is read from the saved output (gradient passes where !(out <= 0)); the
# pre-activation is never stored.


def _relu_grad(grad, out, relu):
    return _threshold_backward(grad, out, 0) if relu else grad


def _bn_train_grads(ops, g, masked_by, input, mean, invstd, weight, needs_input):
    """Training BN backward: (grad_input or None, grad_weight, grad_bias) in float."""
    sum_dy, sum_dy_xhat = ops.batch_norm_backward_reduce(g, masked_by, input, mean, invstd)
    grad_input = None
    if needs_input:
        grad_input = ops.batch_norm_backward_input(
            g, masked_by, input, mean, invstd, weight, sum_dy, sum_dy_xhat
        )
    return grad_input, sum_dy_xhat, sum_dy


def _cast(grad, like):
    return None if like is None or grad is None else grad.to(like.dtype)


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
        sum_g, sum_gx = ops.batch_norm_backward_reduce(
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



def _setup_train(ctx, inputs, output):
    input, weight, bias, residual, eps, relu = inputs
    out, mean, var = output
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, var)
    invstd = torch.rsqrt(var + eps)
    ctx.save_for_backward(input, weight, bias, out if relu else None, mean, invstd)


def _backward_train(ctx, grad, _grad_mean, _grad_var):
    input, weight, bias, out, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.has_residual:
        # The residual's gradient is the masked gradient itself: materialise it once.
        g, masked_by = _relu_grad(grad, out, ctx.relu), None
    else:
        g, masked_by = grad, out  # the kernels apply the ReLU mask on the fly
    grad_input, grad_weight, grad_bias = _bn_train_grads(
        ctx.ops, g, masked_by, input, mean, invstd, weight, need[0]
    )
    return (
        grad_input,
        _cast(grad_weight, weight) if need[1] else None,
        _cast(grad_bias, bias) if need[2] else None,
        g if ctx.has_residual and need[3] else None,
        None,
        None,
    )



def _setup_dual(ctx, inputs, output):
    input, weight, bias, residual, residual_weight, residual_bias, eps, residual_eps, relu = inputs
    out, mean, var, residual_mean, residual_var = output
    ctx.relu = relu
    ctx.mark_non_differentiable(mean, var, residual_mean, residual_var)
    ctx.save_for_backward(
        input, weight, bias, mean, torch.rsqrt(var + eps),
        residual, residual_weight, residual_bias, residual_mean,
        torch.rsqrt(residual_var + residual_eps), out if relu else None,
    )


def _backward_dual(ctx, grad, *_grad_stats):
    (input, weight, bias, mean, invstd, residual, residual_weight, residual_bias,
     residual_mean, residual_invstd, out) = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = _relu_grad(grad, out, ctx.relu)
    gi, gw, gb = _bn_train_grads(ctx.ops, g, None, input, mean, invstd, weight, need[0])
    gr, grw, grb = _bn_train_grads(
        ctx.ops, g, None, residual, residual_mean, residual_invstd, residual_weight, need[3]
    )
    return (
        gi,
        _cast(gw, weight) if need[1] else None,
        _cast(gb, bias) if need[2] else None,
        gr,
        _cast(grw, residual_weight) if need[4] else None,
        _cast(grb, residual_bias) if need[5] else None,
        None,
        None,
        None,
    )



def _setup_add_relu(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_add_relu(ctx, grad):
    (out,) = ctx.saved_tensors
    g = _threshold_backward(grad, out, 0)
    return g, g



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


def _setup_conv2d(ctx, inputs, output):
    (input, weight, bias, residual, input_scale, input_shift, stride, padding, dilation, groups,
     input_relu, relu, emit_stats) = inputs
    out, mean, var = output
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.flags = (bias is not None, residual is not None, input_relu, relu)
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(input, weight, bias, input_scale, input_shift, out if relu else None)


def _backward_conv2d(ctx, grad, _grad_mean, _grad_var):
    """The prologue's output is recomputed from the saved input (the forward never stores
    it); ATen does the data and weight gradients."""
    input, weight, bias, scale, shift, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    has_bias, has_residual, input_relu, relu = ctx.flags
    need = ctx.needs_input_grad
    g = _relu_grad(grad, out, relu)
    conv_input, pre = input, None
    if scale is not None:
        pre = input.float() * broadcast_channel(scale, input) + broadcast_channel(shift, input)
        conv_input = (pre.clamp_min(0) if input_relu else pre).to(input.dtype)
    need_conv_input = need[0] or (scale is not None and (need[4] or need[5]))
    grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, conv_input, weight, [weight.shape[0]] if has_bias else None, stride, padding,
        dilation, False, [0, 0], groups, [need_conv_input, need[1], has_bias and need[2]])
    grad_x = grad_scale = grad_shift = None
    if scale is None:
        grad_x = grad_a
    elif need_conv_input:
        grad_pre = grad_a.float()
        if input_relu:
            grad_pre = grad_pre * (pre > 0)
        dims = [d for d in range(input.dim()) if d != 1]
        grad_x = (grad_pre * broadcast_channel(scale, input)).to(input.dtype) if need[0] else None
        grad_scale = (grad_pre * input.float()).sum(dims) if need[4] else None
        grad_shift = grad_pre.sum(dims) if need[5] else None
    return (grad_x, grad_w, _cast(grad_b, bias) if has_bias else None,
            g if has_residual and need[3] else None, grad_scale, grad_shift) + (None,) * 7


_FAKES = {name: globals()[f"_fake_{name}"] for name in (
    "batch_norm_stats", "batch_norm_apply", "batch_norm_act_train", "dual_batch_norm_act_train",
    "batch_norm_backward_reduce", "batch_norm_backward_input", "add_relu", "conv_bias_relu",
    "conv_bias_add_relu", "conv2d")}

# op name -> (setup_context, backward)
_AUTOGRAD = {
    "batch_norm_apply": (_setup_apply, _backward_apply),
    "batch_norm_act_train": (_setup_train, _backward_train),
    "dual_batch_norm_act_train": (_setup_dual, _backward_dual),
    "add_relu": (_setup_add_relu, _backward_add_relu),
    "conv_bias_relu": (_setup_conv, _backward_conv),
    "conv_bias_add_relu": (_setup_conv, _backward_conv),
    "conv2d": (_setup_conv2d, _backward_conv2d),
}


def register(namespace: str) -> None:
    """Registers fake kernels and autograd for every op of `namespace` named above."""
    ops = getattr(torch.ops, namespace)
    for name, fake in _FAKES.items():
        if hasattr(ops, name):
            torch.library.register_fake(f"{namespace}::{name}", fake)
    for name, (setup, backward) in _AUTOGRAD.items():
        if hasattr(ops, name):

            def setup_context(ctx, inputs, output, setup=setup):
                ctx.ops = ops  # the backward kernels of the same namespace
                setup(ctx, inputs, output)

            torch.library.register_autograd(f"{namespace}::{name}", backward,
                                            setup_context=setup_context)
