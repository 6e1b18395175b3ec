"""Synchronized BN for the fused blocks: batch statistics merged across the processes of a
torch.distributed group, as nn.SyncBatchNorm, with the same fused kernels.

Forward: each process takes its per-channel (count, mean, variance) with batch_norm_stats; an
all_gather and Chan's merge give the group's statistics; one fused normalize (+ residual)
(+ ReLU) pass follows. Backward: sum(g) and sum(g * xhat) are all-reduced for the input
gradient; the weight and bias gradients stay local (DistributedDataParallel averages them),
as in nn.SyncBatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _backend

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm", "sync_batch_norm_act"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics are synchronised across process_group (None:
    the whole world), on any device. The fused blocks run it with the fused kernels; called
    on its own it is plain synchronised BN. Unlike nn.SyncBatchNorm it also runs on the CPU
    (gloo), and DistributedDataParallel accepts it there."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        if uses_sync(self):
            return sync_batch_norm_act(input, self, relu=False)
        return super().forward(input)


def _ops(device):
    backend = _backend.resolve(device)
    if backend == "reference":
        raise RuntimeError("fusedres: synchronized BN needs a compiled backend (cpp, cuda or "
                           "triton)")
    return _backend.op_library(backend)


def _group_moments(mean, var, count, group):
    """(mean, biased var, total count) of the union of every process's batch."""
    local = torch.stack([torch.full_like(mean, float(count)), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    n, m, m2 = gathered[0].unbind(0)
    for other in gathered[1:]:  # Chan's merge, rank by rank
        n_b, m_b, m2_b = other.unbind(0)
        total = n + n_b
        w_b = torch.where(total > 0, n_b / total.clamp_min(1), torch.zeros_like(total))
        delta = m_b - m
        m, m2, n = m + delta * w_b, m2 + m2_b + delta * delta * n * w_b, total
    return m, m2 / n.clamp_min(1), n[0].item()


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu, group):
        ops = _ops(input.device)
        count = input.numel() // input.shape[1]
        mean, var = ops.batch_norm_stats(input)
        mean, var, total = _group_moments(mean, var, count, group)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
        shift = bias.to(invstd.dtype) if bias is not None else None
        out = ops.batch_norm_apply(input, mean, scale, shift, residual, None, None, None, relu)
        # The ReLU mask: recomputed from input with scale / shift without a residual, else read
        # from the output (as fusedres/_ops.py's training ops).
        recompute = relu and residual is None
        ctx.save_for_backward(input, weight, bias, out if relu and not recompute else None, mean,
                              invstd, scale if recompute else None, shift if recompute else None)
        ctx.relu, ctx.has_residual, ctx.group = relu, residual is not None, group
        ctx.local_share = count / total  # local count / group count
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var, torch.tensor(total)

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var, _grad_total):
        input, weight, bias, out, mean, invstd, scale, shift = ctx.saved_tensors
        ops = _ops(input.device)
        # With a residual before the ReLU, the reduce pass also writes the masked gradient
        # (the residual's), which the input pass then reads unmasked.
        write_grad = ctx.has_residual and ctx.relu
        sum_dy, sum_dy_xhat, masked_grad, *_ = ops.batch_norm_backward_reduce(
            grad, out, input, mean, invstd, write_grad, scale, shift)
        g = grad
        if write_grad:
            g, out = masked_grad, None
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(bias.dtype) if bias is not None else None
        group_sums = torch.stack([sum_dy, sum_dy_xhat])
        dist.all_reduce(group_sums, group=ctx.group)
        # The kernel divides by the local count: scale the group sums to divide by the group's.
        group_sums = group_sums * ctx.local_share
        grad_input = ops.batch_norm_backward_input(g, out, input, mean, invstd, weight,
                                                   group_sums[0], group_sums[1], scale, shift)
        return (grad_input, grad_weight, grad_bias, g if ctx.has_residual else None, None, None,
                None)


def sync_batch_norm_act(input: Tensor, bn: SyncBatchNorm2d, residual: Optional[Tensor] = None,
                        relu: bool = True) -> Tensor:
    """relu?(bn(input) + residual) for a training-mode SyncBatchNorm2d `bn`, with its running
    statistics and num_batches_tracked updated as nn.SyncBatchNorm does."""
    group = bn.process_group or dist.group.WORLD
    out, mean, var, total = _SyncBatchNormAct.apply(input, bn.weight, bn.bias, residual, bn.eps,
                                                    relu, group)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            total = int(total)
            if total > 0:
                unbiased = var * (total / max(total - 1, 1))
                bn.running_mean.mul_(1 - factor).add_((mean * factor).to(bn.running_mean.dtype))
                bn.running_var.mul_(1 - factor).add_((unbiased * factor).to(bn.running_var.dtype))
    return out


def uses_sync(bn: nn.Module) -> bool:
    """True where bn must synchronise: a training SyncBatchNorm2d in a group of > 1 process."""
    return (isinstance(bn, SyncBatchNorm2d) and bn.training and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(bn.process_group or dist.group.WORLD) > 1)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replaces every nn.BatchNorm2d of model (in place) by a SyncBatchNorm2d with the same
    parameters, buffers and state_dict keys, which the fused blocks then run synchronised
    across process_group (default: the whole world). Returns the model."""
    if type(model) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(model.num_features, model.eps, model.momentum, model.affine,
                               model.track_running_stats, process_group=process_group)
        if model.affine:
            with torch.no_grad():
                sync.weight, sync.bias = model.weight, model.bias
        sync.running_mean, sync.running_var = model.running_mean, model.running_var
        sync.num_batches_tracked = model.num_batches_tracked
        sync.train(model.training)
        return sync
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child, process_group))
    return model

