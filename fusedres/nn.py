"""ResNet building blocks whose forward runs the fused ops of the active backend.

The blocks have exactly torchvision's submodules (conv1, bn1, ..., downsample), so their
state_dict keys and shapes are torchvision's. What changes is the forward:

- training BN: the convolution, then one fused BN (+ residual) (+ ReLU) op; a projection
  shortcut uses the dual form relu(bn3(conv3(x)) + bn_ds(conv_ds(identity)));
- eval / frozen BN: the BN folded into the convolution, which then runs with its fused
  bias (+ residual) + ReLU epilogue. Folded weights are cached only when no autograd graph is
  needed, keyed by the identity and version counter of every tensor they come from, so an
  optimizer step, load_state_dict or .to() refreshes them;
- a BN replaced by nn.Identity (fusedres.fold_bn): the convolution's own bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as FF
from .sync_batchnorm import sync_batch_norm_act, uses_sync

__all__ = ["BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "conv_bn_act", "conv_bn_add_act"]


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


# ---- the block's input ---------------------------------------------------------------------------


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False on devices without autocast (meta) instead of raising."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_input(module: nn.Module, x, conv: nn.Conv2d) -> None:
    """Checks the input of a fused block or model against its first convolution `conv`, so
    that a bad input fails here with one clear message (shape checks only: no sync)."""
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"fusedres: {name} input must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fusedres: {name} input must have shape (N, C, H, W) (4-D), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in FF._FLOAT_DTYPES:
        raise TypeError(f"fusedres: {name} input must be float16, bfloat16, float32 or float64, "
                        f"got {x.dtype}")
    in_channels, weight = getattr(conv, "in_channels", None), getattr(conv, "weight", None)
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"fusedres: {name} input must have {in_channels} channels "
                         f"(conv1.in_channels), got shape {tuple(x.shape)}")
    if not isinstance(weight, Tensor):
        return
    if x.device != weight.device:
        raise RuntimeError(f"fusedres: {name} input is on {x.device} but its parameters are on "
                           f"{weight.device}")
    if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
        raise TypeError(f"fusedres: {name} input must have the dtype of its parameters "
                        f"({weight.dtype}), got {x.dtype}; convert one of them (model.to(dtype)) "
                        f"or run under torch.autocast")


# ---- BN state as nn.BatchNorm2d.forward sees it ----------------------------------------------


def _is_frozen(bn: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d and look-alikes: a fixed affine, no training mode."""
    return not isinstance(bn, nn.modules.batchnorm._BatchNorm) and hasattr(bn, "running_var")


def _foldable(norm: nn.Module) -> bool:
    """A BN the fused ops handle (BatchNorm, frozen BN, or nn.Identity after fold_bn); any
    other norm_layer (GroupNorm, say) runs as its own module."""
    return (isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.Identity))
            or _is_frozen(norm))


def _bn_training(bn: nn.Module) -> bool:
    if _is_frozen(bn) or isinstance(bn, nn.Identity):  # nn.Identity: folded away by fold_bn
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _bn_args(bn: nn.Module) -> dict:
    """Keyword arguments of the fused functions for a training-mode BN, as nn.BatchNorm2d."""
    track = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if use_running else None,
        running_var=bn.running_var if use_running else None,
        weight=bn.weight, bias=bn.bias, training=True,
        momentum=bn.momentum, eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if track else None,
    )


def _conv(x: Tensor, conv: nn.Conv2d, weight=None, bias=None) -> Tensor:
    weight = conv.weight if weight is None else weight
    if bias is not None:
        bias = bias.to(x.dtype)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# ---- eval: BN folded into the convolution -------------------------------------------------------


def _fold_key(conv, bn):
    tensors = [conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                 for t in tensors)


def folded(owner: nn.Module, name: str, conv: nn.Conv2d, bn: nn.Module):
    """(weight, bias) of conv with the eval BN bn folded in; cached on owner under name when
    no autograd graph is wanted (refreshed whenever a source tensor changes)."""
    if isinstance(bn, nn.Identity):
        return conv.weight, conv.bias
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return FF.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                               bn.weight, bn.bias)
    cache = owner.__dict__.setdefault("_fusedres_folded", {})
    key = _fold_key(conv, bn)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        weight, bias = FF.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                       bn.eps, bn.weight, bn.bias)
        hit = cache[name] = (key, weight, bias)
    return hit[1], hit[2]


# ---- the fused conv + BN (+ residual) (+ ReLU) ---------------------------------------------------


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under autocast, the folded convolution runs in the autocast dtype, as F.conv2d would
    (the fused ops themselves are not autocast-aware)."""
    device = x.device.type
    if not _autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), bias


def conv_bn_act(owner: nn.Module, name: str, x: Tensor, conv: nn.Conv2d, bn: nn.Module,
                relu: bool = True) -> Tensor:
    """act(bn(conv(x))) with the fused ops."""
    if not _foldable(bn):
        y = bn(_conv(x, conv))
        return torch.relu(y) if relu else y
    if uses_sync(bn):
        return sync_batch_norm_act(_conv(x, conv), bn, relu=relu)
    if _bn_training(bn):
        return FF.batch_norm_relu(_conv(x, conv), **_bn_args(bn), relu=relu)
    x, weight, bias = _autocast(x, *folded(owner, name, conv, bn))
    if relu:
        return FF.conv_bias_relu(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                                 conv.groups)
    return _conv(x, conv, weight, bias)


def _conv_bn_pair(module: Optional[nn.Module]):
    """(conv, bn) of a torchvision-style downsample Sequential, else None."""
    if (isinstance(module, nn.Sequential) and len(module) == 2
            and isinstance(module[0], nn.Conv2d) and _foldable(module[1])):
        return module[0], module[1]
    return None


def conv_bn_add_act(owner: nn.Module, name: str, x: Tensor, conv: nn.Conv2d, bn: nn.Module,
                    identity: Tensor, downsample: Optional[nn.Module]) -> Tensor:
    """relu(bn(conv(x)) + shortcut(identity)): the end of a residual block, where the shortcut
    is the identity or `downsample` (a conv + BN pair, fused as well)."""
    pair = _conv_bn_pair(downsample)
    if not _foldable(bn):
        shortcut = downsample(identity) if downsample is not None else identity
        return FF.add_relu(bn(_conv(x, conv)), shortcut)
    if uses_sync(bn):
        if pair is not None:
            shortcut = conv_bn_act(owner, name + ".downsample", identity, *pair, relu=False)
        else:
            shortcut = downsample(identity) if downsample is not None else identity
        return sync_batch_norm_act(_conv(x, conv), bn, shortcut)
    if _bn_training(bn):
        y = _conv(x, conv)
        if pair is not None and _bn_training(pair[1]) and not uses_sync(pair[1]):
            z = _conv(identity, pair[0])
            args, residual_args = _bn_args(bn), _bn_args(pair[1])
            return FF.dual_batch_norm_add_relu(
                y, z, args["running_mean"], args["running_var"], residual_args["running_mean"],
                residual_args["running_var"], args["weight"], args["bias"],
                residual_args["weight"], residual_args["bias"], True, args["momentum"],
                args["eps"], residual_momentum=residual_args["momentum"],
                residual_eps=residual_args["eps"],
                num_batches_tracked=args["num_batches_tracked"],
                residual_num_batches_tracked=residual_args["num_batches_tracked"])
        if pair is not None:
            shortcut = conv_bn_act(owner, name + ".downsample", identity, *pair, relu=False)
        else:
            shortcut = downsample(identity) if downsample is not None else identity
        return FF.batch_norm_add_relu(y, shortcut, **_bn_args(bn))
    if pair is not None and not _bn_training(pair[1]):
        identity_, ds_weight, ds_bias = _autocast(identity, *folded(owner, name + ".downsample",
                                                                    *pair))
        shortcut = _conv(identity_, pair[0], ds_weight, ds_bias)
    else:
        shortcut = downsample(identity) if downsample is not None else identity
    x, weight, bias = _autocast(x, *folded(owner, name, conv, bn))
    return FF.conv_bias_add_relu(x, weight, bias, shortcut.to(x.dtype), conv.stride,
                                 conv.padding, conv.dilation, conv.groups)


# ---- blocks ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same submodules and arguments), fused."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, stride_in_1x1: bool = False) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1)
        out = conv_bn_act(self, "1", x, self.conv1, self.bn1)
        return conv_bn_add_act(self, "2", out, self.conv2, self.bn2, x, self.downsample)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: stride in the 3x3), fused. With
    stride_in_1x1=True the stride sits in the first 1x1 instead (the original ResNet v1 of the
    paper and of Keras)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, stride_in_1x1: bool = False) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width, stride if stride_in_1x1 else 1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, 1 if stride_in_1x1 else stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1)
        out = conv_bn_act(self, "1", x, self.conv1, self.bn1)
        out = conv_bn_act(self, "2", out, self.conv2, self.bn2)
        return conv_bn_add_act(self, "3", out, self.conv3, self.bn3, x, self.downsample)
