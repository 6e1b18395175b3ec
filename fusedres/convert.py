"""convert(): torchvision and timm ResNets to fused ones in place of their blocks; fold_bn():
an inference model with every BatchNorm folded into the convolution before it."""
from __future__ import annotations

import copy

from torch import nn

from . import models
from . import nn as fnn
from .functional import fold_conv_bn
from .sync_batchnorm import SyncBatchNorm2d

__all__ = ["convert", "fold_bn"]

# torchvision class -> fused class with the same submodules and attributes
_FUSED = {
    ("torchvision.models.resnet", "BasicBlock"): fnn.BasicBlock,
    ("torchvision.models.resnet", "Bottleneck"): fnn.Bottleneck,
    ("torchvision.models.resnet", "ResNet"): models.ResNet,
}


def _is_plain_bn(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, SyncBatchNorm2d) or fnn._is_frozen(module)


def _timm_block_is_plain(block: nn.Module) -> bool:
    """A timm ResNet block without the extras the fused forward does not implement (SE,
    anti-aliasing, DropBlock, DropPath, activations other than ReLU, BN with its own act)."""
    acts = [getattr(block, name) for name in ("act1", "act2", "act3") if hasattr(block, name)]
    bns = [getattr(block, name) for name in ("bn1", "bn2", "bn3") if hasattr(block, name)]
    return (block.se is None and block.drop_path is None
            and isinstance(block.drop_block, nn.Identity) and isinstance(block.aa, nn.Identity)
            and all(type(a) is nn.ReLU for a in acts) and all(_is_plain_bn(b) for b in bns))


def _timm_fused_forward(self, x):
    if not _timm_block_is_plain(self):
        return self._fusedres_original_forward(x)
    fnn.check_input(self, x, self.conv1)
    if hasattr(self, "conv3"):  # Bottleneck
        out = fnn.conv_bn_act(self, "1", x, self.conv1, self.bn1)
        out = fnn.conv_bn_act(self, "2", out, self.conv2, self.bn2)
        return fnn.conv_bn_add_act(self, "3", out, self.conv3, self.bn3, x, self.downsample)
    out = fnn.conv_bn_act(self, "1", x, self.conv1, self.bn1)
    return fnn.conv_bn_add_act(self, "2", out, self.conv2, self.bn2, x, self.downsample)


_TIMM_FUSED: dict = {}


def _timm_fused(cls):
    """A subclass of a timm block class whose forward is fused when the block is plain, and
    timm's own otherwise."""
    if cls not in _TIMM_FUSED:
        _TIMM_FUSED[cls] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _timm_fused_forward, "_fusedres_original_forward": cls.forward,
            "__module__": __name__})
    return _TIMM_FUSED[cls]


def _fused_class(module: nn.Module):
    key = (type(module).__module__, type(module).__name__)
    if key in _FUSED:
        return _FUSED[key]
    if key in (("timm.models.resnet", "BasicBlock"), ("timm.models.resnet", "Bottleneck")):
        return _timm_fused(type(module))
    return None


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Returns `model` with its torchvision ResNet blocks (and the ResNet around them) and
    timm ResNet blocks running the fused ops. The modules keep their parameters, buffers,
    state_dict keys and hooks: only their forward changes. Modules it does not recognise are
    left as they are (timm blocks with SE, anti-aliasing, DropBlock / DropPath or other
    activations keep timm's forward). With verbose, prints what it converted."""
    _check_module(model, "convert")
    if not inplace:
        model = copy.deepcopy(model)
    converted = []
    for name, module in model.named_modules():
        fused = _fused_class(module)
        if fused is not None:
            module.__class__ = fused  # same attributes: only forward changes
            converted.append((name or "(model)", fused.__name__))
    if verbose:
        print(f"fusedres.convert: {len(converted)} module(s) converted")
        for name, kind in converted:
            print(f"  {name}: {kind}")
    return model


def _check_module(model, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.{function}: model must be an nn.Module, got "
                        f"{type(model).__name__}")


def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    weight, bias = fold_conv_bn(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                bn.running_mean, bn.running_var, bn.eps,
                                None if bn.weight is None else bn.weight.detach(),
                                None if bn.bias is None else bn.bias.detach())
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or fnn._is_frozen(module)


def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference model with each BatchNorm (or FrozenBatchNorm2d) folded into the
    convolution before it and replaced by nn.Identity: in fusedres blocks, converted
    torchvision models and nn.Sequential(conv, bn, ...) runs. The model must be in eval mode."""
    _check_module(model, "fold_bn")
    if model.training:
        raise RuntimeError("fusedres.fold_bn: the model is in training mode, whose BatchNorm uses "
                           "batch statistics and cannot be folded; call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = []  # (parent module, conv, name of the BN in parent, its full name)
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        if isinstance(module, (fnn.BasicBlock, fnn.Bottleneck, models.ResNet)):
            for i in (1, 2, 3):
                if hasattr(module, f"bn{i}") and _is_bn(getattr(module, f"bn{i}")):
                    pairs.append((module, getattr(module, f"conv{i}"), f"bn{i}",
                                  f"{prefix}bn{i}"))
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, first), (bn_name, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and _is_bn(second):
                    pairs.append((module, first, bn_name, prefix + bn_name))
    for module, _, bn_name, name in pairs:  # check all before changing any
        bn = getattr(module, bn_name)
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"fusedres.fold_bn: {name} has no running statistics "
                             "(track_running_stats=False: it normalises with the batch's "
                             "statistics in eval mode too) and cannot be folded")
    for module, conv, bn_name, _ in pairs:
        _fold_pair(conv, getattr(module, bn_name))
        setattr(module, bn_name, nn.Identity())
    return model
