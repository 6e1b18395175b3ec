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


def fused_conv2d(input, weight, bias, residual, input_scale, input_shift, input_relu, relu,
                 stride, padding, dilation, groups):
    """Prologue (per-channel affine + ReLU) -> conv -> bias + residual -> ReLU, and the
    output's per-channel mean and biased variance (float32)."""
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
    with torch.no_grad():
        var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), correction=0)
    return out, mean, var
