"""The `reference` backend: the unfused PyTorch computation every fused op is defined by.

Also what `auto` falls back to where no compiled backend can run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _accumulate(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """F.batch_norm; momentum may be a tensor factor (the momentum=None cumulative average)."""
    if momentum is None:  # nothing to average (eval, or no running statistics); F wants a float
        momentum = 0.0
    if training and running_mean is not None and isinstance(momentum, torch.Tensor):
        # F.batch_norm takes a float factor only: update the running stats by hand.
        out = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        if input.numel() > 0:
            dims = [d for d in range(input.dim()) if d != 1]
            with torch.no_grad():
                var, mean = torch.var_mean(input.to(_accumulate(input.dtype)), dim=dims,
                                             correction=1)
                running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_((var * momentum).to(running_var.dtype))
        return out
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_act(input, residual, running_mean, running_var, weight, bias, training,
                   momentum, eps, relu):
    out = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def add_relu(input, residual):
    return torch.relu(input + residual)


def fold_conv_bn(conv_weight, conv_bias, bn_running_mean, bn_running_var, bn_eps, bn_weight,
                 bn_bias):
    acc = _accumulate(conv_weight.dtype)
    scale = torch.rsqrt(bn_running_var.to(acc) + bn_eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shape = (-1,) + (1,) * (conv_weight.dim() - 1)
    weight = (conv_weight.to(acc) * scale.reshape(shape)).to(conv_weight.dtype)
    bias = -bn_running_mean.to(acc)
    if conv_bias is not None:
        bias = bias + conv_bias.to(acc)
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(acc)
    return weight, bias.to(conv_bias.dtype if conv_bias is not None else conv_weight.dtype)


def conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups):
    if bias is not None:
        bias = bias.to(input.dtype)
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out)


def conv_output_shape(input, weight, stride, padding, dilation):
    size = [input.shape[0], weight.shape[0]]
    for d in range(2):
        extent = dilation[d] * (weight.shape[d + 2] - 1) + 1
        size.append((input.shape[d + 2] + 2 * padding[d] - extent) // stride[d] + 1)
    return tuple(size)




# ---- the raw ops (torch.ops.fusedres.* / fusedres_triton.*), by the same names and arguments --
# The math of each op's schema comment in csrc/fusedres.cpp, unfused; the tests compare every
# namespace's raw op with these (tests/test_registration.py).


def _column(v, like):
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def _dims(x):
    return [d for d in range(x.dim()) if d != 1]


def batch_norm_stats(input):
    """(mean, biased variance) per channel, in the accumulation dtype."""
    var, mean = torch.var_mean(input.to(_accumulate(input.dtype)), dim=_dims(input), correction=0)
    return mean, var


def batch_norm_apply(input, mean, scale, shift, residual, residual_mean, residual_scale,
                     residual_shift, relu):
    acc = _accumulate(input.dtype)
    out = (input.to(acc) - _column(mean, input)) * _column(scale, input)
    if shift is not None:
        out = out + _column(shift, input)
    if residual is not None:
        r = residual.to(acc)
        if residual_mean is not None:
            r = r - _column(residual_mean, input)
        if residual_scale is not None:
            r = r * _column(residual_scale, input)
        if residual_shift is not None:
            r = r + _column(residual_shift, input)
        out = out + r
    return (torch.relu(out) if relu else out).to(input.dtype)


def scale_shift(var, weight, bias, eps):
    """BN as (x - mean) * scale + shift: scale = weight / sqrt(var + eps), shift = bias, in
    var's dtype."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(var.dtype)
    return scale, bias.to(var.dtype) if bias is not None else None


def batch_norm_coefficients(input, running_mean, running_var, weight, bias, eps):
    """The batch_norm_coefficients op: an eval BN's (mean, scale, shift), new tensors in the
    dtype of input's statistics."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    _, scale, shift = train_coefficients(running_var.to(acc), weight, bias, eps)
    return running_mean.to(acc, copy=True), scale, shift


def train_coefficients(var, weight, bias, eps):
    """(invstd, scale, shift) as batch_norm_act_train returns them: fresh tensors in var's
    dtype, shift 0 without a bias (also the Triton training forward of an empty batch)."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight.to(var.dtype) if weight is not None else invstd.clone()
    shift = bias.to(var.dtype, copy=True) if bias is not None else torch.zeros_like(var)
    return invstd, scale, shift


def update_running_stats(running_mean, running_var, counter, momentum, mean, var, count):
    """nn.BatchNorm2d's update, as the training ops make it (csrc/channel_stats.h,
    RunningStats): the counter counts the batch; factor = momentum or 1 / counter; the running
    statistics move by factor towards mean and the unbiased variance (not for an empty batch)."""
    with torch.no_grad():
        if counter is not None:
            counter.add_(1)
        if running_mean is None or count == 0:
            return
        factor = momentum if momentum is not None else 1.0 / counter.item()
        for running, batch in ((running_mean, mean), (running_var, var * count / (count - 1))):
            running.copy_(torch.lerp(running.to(batch.dtype), batch, factor))


def _values_per_channel(input):
    return input.numel() // input.shape[1] if input.numel() else 0


def batch_norm_act_train(input, weight, bias, residual, eps, relu, running_mean=None,
                         running_var=None, num_batches_tracked=None, momentum=0.1):
    mean, var = batch_norm_stats(input)
    invstd, scale, shift = train_coefficients(var, weight, bias, eps)
    out = batch_norm_apply(input, mean, scale, shift, residual, None, None, None, relu)
    update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                         _values_per_channel(input))
    return out, mean, var, invstd, scale, shift


def add_batch_norm_stats(input, residual):
    total = input + residual
    return (total, *batch_norm_stats(total))


def add_batch_norm_act_train(input, residual, weight, bias, eps, relu, *running):
    total = input + residual
    out, *statistics = batch_norm_act_train(total, weight, bias, None, eps, relu, *running)
    return (out, total, *statistics)


def dual_batch_norm_act_train(input, weight, bias, residual, residual_weight, residual_bias, eps,
                              residual_eps, relu, running_mean=None, running_var=None,
                              num_batches_tracked=None, momentum=0.1, residual_running_mean=None,
                              residual_running_var=None, residual_num_batches_tracked=None,
                              residual_momentum=0.1):
    mean, var = batch_norm_stats(input)
    residual_mean, residual_var = batch_norm_stats(residual)
    count = _values_per_channel(input)
    update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                         count)
    update_running_stats(residual_running_mean, residual_running_var,
                         residual_num_batches_tracked, residual_momentum, residual_mean,
                         residual_var, count)
    scale, shift = scale_shift(var, weight, bias, eps)
    r_scale, r_shift = scale_shift(residual_var, residual_weight, residual_bias, residual_eps)
    out = batch_norm_apply(input, mean, scale, shift, residual, residual_mean, r_scale, r_shift,
                           relu)
    return (out, mean, var, torch.rsqrt(var + eps), residual_mean, residual_var,
            torch.rsqrt(residual_var + residual_eps))


def _masked(grad_out, output, input, mean, scale, shift):
    """grad_out where the forward's output > 0: output, or recomputed from input (scale)."""
    acc = _accumulate(grad_out.dtype)
    g = grad_out.to(acc)
    if output is None and scale is not None:
        output = batch_norm_apply(input, mean, scale, shift, None, None, None, None, True)
    return g if output is None else torch.where(output <= 0, torch.zeros_like(g), g)


def batch_norm_backward_reduce(grad_out, output, input, mean, invstd, write_grad=False,
                               scale=None, shift=None, grad_dtype=None):
    """(sum(g), sum(g * xhat), g or an empty tensor) per channel, g masked by the forward's
    ReLU (output > 0 from output, or from the output recomputed with scale and shift); then
    with grad_dtype the last two again in that dtype (grad_weight, grad_bias), else empty."""
    g = _masked(grad_out, output, input, mean, scale, shift)
    xhat = (input.to(g.dtype) - _column(mean, input)) * _column(invstd, input)
    masked_grad = g.to(input.dtype) if write_grad else input.new_empty(0)
    sum_dy, sum_dy_xhat = g.sum(_dims(input)), (g * xhat).sum(_dims(input))
    grads = ((sum_dy_xhat.to(grad_dtype), sum_dy.to(grad_dtype)) if grad_dtype is not None
             else (sum_dy.new_empty(0), sum_dy.new_empty(0)))
    return sum_dy, sum_dy_xhat, masked_grad, *grads


def batch_norm_backward_input(grad_out, output, input, mean, invstd, weight, sum_dy,
                              sum_dy_xhat, scale=None, shift=None, extra_grad=None):
    g = _masked(grad_out, output, input, mean, scale, shift)
    count = input.numel() // input.shape[1] if input.numel() else 1
    xhat = (input.to(g.dtype) - _column(mean, input)) * _column(invstd, input)
    k = invstd if weight is None else invstd * weight.to(invstd.dtype)
    out = _column(k, input) * (g - _column(sum_dy, input) / count
                               - xhat * _column(sum_dy_xhat, input) / count)
    if extra_grad is not None:
        out = out + extra_grad.to(out.dtype)
    return out.to(input.dtype)


def dual_batch_norm_backward(grad_out, output, input, mean, invstd, weight, residual,
                             residual_mean, residual_invstd, residual_weight, grad_dtype=None,
                             residual_grad_dtype=None):
    """Both BNs' gradients of relu(bn(input) + bn_r(residual)), each as
    batch_norm_backward_reduce and batch_norm_backward_input give it for the masked gradient:
    (grad_input, grad_residual, grad_weight, grad_bias, grad_residual_weight,
    grad_residual_bias)."""
    g = _masked(grad_out, output, input, mean, None, None)
    inputs, params = [], []
    for x, m, i, w, dtype in [(input, mean, invstd, weight, grad_dtype),
                              (residual, residual_mean, residual_invstd, residual_weight,
                               residual_grad_dtype)]:
        sum_dy, sum_dy_xhat, *_ = batch_norm_backward_reduce(g, None, x, m, i)
        inputs.append(batch_norm_backward_input(g, None, x, m, i, w, sum_dy, sum_dy_xhat)
                      .to(input.dtype))
        params += [sum_dy_xhat.to(dtype or sum_dy.dtype), sum_dy.to(dtype or sum_dy.dtype)]
    return (*inputs, *params)


def conv_bias_relu(input, weight, bias, stride, padding, dilation, groups):
    return conv_bias_act(input, weight, bias, None, stride, padding, dilation, groups)


def conv_bias_add_relu(input, weight, bias, residual, stride, padding, dilation, groups):
    return conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups)


def fused_conv2d(input, weight, bias, residual, input_scale, input_shift, stride, padding,
                 dilation, groups, input_relu, relu, emit_stats):
    """The Triton namespace's fused convolution: prologue (per-channel affine + ReLU) -> conv
    -> bias + residual -> ReLU, and with emit_stats the output's per-channel mean and biased
    variance (float32)."""
    a = input
    if input_scale is not None:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        a = input.float() * input_scale.float().reshape(shape) + input_shift.float().reshape(shape)
        a = (torch.relu(a) if input_relu else a).to(input.dtype)
    out = F.conv2d(a, weight, bias.to(input.dtype) if bias is not None else None, stride,
                   padding, dilation, groups)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    if not emit_stats:
        return out, out.new_empty(0, dtype=torch.float32), out.new_empty(0, dtype=torch.float32)
    with torch.no_grad():
        var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), correction=0)
    return out, mean, var
