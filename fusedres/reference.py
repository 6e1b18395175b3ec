"""The `reference` backend: the unfused PyTorch computation every fused op is defined by.

Also what `auto` falls back to where no compiled backend can run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """F.batch_norm; momentum may be a tensor factor (the momentum=None cumulative average)."""
    if training and running_mean is not None and isinstance(momentum, torch.Tensor):
        # F.batch_norm takes a float factor only: update the running stats by hand.
        out = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        if input.numel() > 0:
            dims = [d for d in range(input.dim()) if d != 1]
            with torch.no_grad():
                var, mean = torch.var_mean(input.float(), dim=dims, correction=1)
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
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
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
