"""Triton: the training-mode fused BN forwards, as csrc/batch_norm_train.h: batch
statistics (batch_norm_stats.py; their merge also updates the running statistics), then one
normalize (+ residual) (+ ReLU) pass (batch_norm_apply.py). Autograd: fusedres/_ops.py.

The ops update buffers in place, which torch.library.custom_op would not give an autograd
formula: they are defined with the C++ ops' schemas (csrc/fusedres.cpp) instead."""
from __future__ import annotations

import torch

from fusedres._ops import check

from .batch_norm_apply import normalize_act
from .batch_norm_stats import channel_stats

_RUNNING = ("Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
            "Tensor(c!)? num_batches_tracked=None, float? momentum=0.1")
_LIBRARY = torch.library.Library("fusedres_triton", "FRAGMENT")
_LIBRARY.define(
    "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
    f"float eps, bool relu, {_RUNNING}) -> (Tensor out, Tensor mean, Tensor var, "
    "Tensor invstd, Tensor scale, Tensor shift)")
_LIBRARY.define(
    "add_batch_norm_act_train(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
    f"float eps, bool relu, {_RUNNING}) -> (Tensor out, Tensor sum, Tensor mean, Tensor var, "
    "Tensor invstd, Tensor scale, Tensor shift)")
_LIBRARY.define(
    "dual_batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor residual, "
    "Tensor? residual_weight, Tensor? residual_bias, float eps, float residual_eps, bool relu, "
    f"{_RUNNING}, Tensor(d!)? residual_running_mean=None, Tensor(e!)? residual_running_var=None, "
    "Tensor(f!)? residual_num_batches_tracked=None, float? residual_momentum=0.1) -> "
    "(Tensor out, Tensor mean, Tensor var, Tensor invstd, Tensor residual_mean, "
    "Tensor residual_var, Tensor residual_invstd)")


def _impl(fn):
    _LIBRARY.impl(fn.__name__, fn, "CompositeExplicitAutograd")
    return fn


@_impl
def batch_norm_act_train(input, weight, bias, residual, eps, relu, running_mean=None,
                         running_var=None, num_batches_tracked=None, momentum=0.1):
    check("batch_norm_act_train", input, weight, bias, residual, eps, relu, running_mean,
          running_var, num_batches_tracked, momentum)
    mean, var, invstd, scale, shift = channel_stats(
        input, (weight, bias, eps), running=(running_mean, running_var, num_batches_tracked,
                                             momentum))
    out = normalize_act(input, mean, scale, shift, residual, relu=relu)
    return out, mean, var, invstd, scale, shift


@_impl
def add_batch_norm_act_train(input, residual, weight, bias, eps, relu, running_mean=None,
                             running_var=None, num_batches_tracked=None, momentum=0.1):
    check("add_batch_norm_act_train", input, residual, weight, bias, eps, relu, running_mean,
          running_var, num_batches_tracked, momentum)
    total, mean, var, invstd, scale, shift = channel_stats(
        input, (weight, bias, eps), residual,
        running=(running_mean, running_var, num_batches_tracked, momentum))
    out = normalize_act(total, mean, scale, shift, relu=relu)
    return out, total, mean, var, invstd, scale, shift


@_impl
def dual_batch_norm_act_train(input, weight, bias, residual, residual_weight, residual_bias, eps,
                              residual_eps, relu, running_mean=None, running_var=None,
                              num_batches_tracked=None, momentum=0.1, residual_running_mean=None,
                              residual_running_var=None, residual_num_batches_tracked=None,
                              residual_momentum=0.1):
    check("dual_batch_norm_act_train", input, weight, bias, residual, residual_weight,
          residual_bias, eps, residual_eps, relu, running_mean, running_var, num_batches_tracked,
          momentum, residual_running_mean, residual_running_var, residual_num_batches_tracked,
          residual_momentum)
    # Both BNs' statistics in one statistics launch and one merge.
    ((mean, var, invstd, scale, shift),
     (residual_mean, residual_var, residual_invstd, residual_scale, residual_shift)) = \
        channel_stats(input, (weight, bias, eps),
                      running=(running_mean, running_var, num_batches_tracked, momentum),
                      second=(residual, (residual_weight, residual_bias, residual_eps),
                              (residual_running_mean, residual_running_var,
                               residual_num_batches_tracked, residual_momentum)))
    out = normalize_act(input, mean, scale, shift, residual, residual_mean, residual_scale,
                        residual_shift, relu)
    return out, mean, var, invstd, residual_mean, residual_var, residual_invstd
