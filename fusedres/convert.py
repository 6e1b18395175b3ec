"""convert() / unconvert(): torchvision and timm ResNets with a fused forward and back, in
place; fold_bn(): an inference model with every BatchNorm folded into the convolution
before it.

convert() and unconvert() only change the class of the blocks (and of torchvision's ResNet),
as torch's own convert_sync_batchnorm changes modules in place: parameters, buffers,
state_dict keys, hooks, and any optimizer or EMA copy built beforehand stay valid.
"""
from __future__ import annotations

import copy
import warnings

import torchvision.models.resnet as tv
from torch import nn
from torch.nn.utils import parametrize

from . import models
from . import nn as fnn
from .functional import fold_conv_bn

__all__ = ["convert", "unconvert", "fold_bn"]

# torchvision class -> fused class with the same submodules and attributes
_FUSED = {tv.BasicBlock: fnn.BasicBlock, tv.Bottleneck: fnn.Bottleneck, tv.ResNet: models.ResNet}
_TIMM_BLOCKS = (("timm.models.resnet", "BasicBlock"), ("timm.models.resnet", "Bottleneck"))
_TIMM_FUSED: dict = {}  # timm block class -> its fused subclass
_UNFUSED = {fused: plain for plain, fused in _FUSED.items()}


# ---- timm's ResNet blocks -----------------------------------------------------------------------


def _timm_plain_reason(block):
    """Why a timm block must run timm's own forward right now (None: the fused one runs).
    SE, DropPath and anti-aliasing do not stop the fusion (they run as modules between the
    fused ops); a non-ReLU activation, a norm layer other than BN, an active DropBlock (between
    a BN and its activation) or a hook on a BN / activation does."""
    n = 3 if hasattr(block, "conv3") else 2
    norms = [(f"bn{i}", getattr(block, f"bn{i}")) for i in range(1, n + 1)]
    reason = fnn.plain_reason(
        norms + fnn.downsample_norms(block.downsample),
        [(f"act{i}", getattr(block, f"act{i}")) for i in range(1, n + 1)],
        [("downsample", block.downsample), ("drop_block", block.drop_block)])
    if reason is None and not fnn.is_identity(block.drop_block):
        reason = "drop_block is active (it sits between a BN and its activation)"
    return reason


def _timm_fused_forward(self, x):
    if fnn.folded_on_cpu(fnn.block_norms(self), x) or _timm_plain_reason(self) is not None:
        return self._fusedres_original_forward(x)
    fnn.check_input(self, x, self.conv1)
    tail = (self.se, self.drop_path)  # between the last BN and the residual add
    if hasattr(self, "conv3"):  # Bottleneck: conv1-bn1-act1, conv2-bn2-act2-aa, conv3-bn3
        out = fnn.conv_bn_act(x, self.conv1, self.bn1)
        out = self.aa(fnn.conv_bn_act(out, self.conv2, self.bn2))
        return fnn.conv_bn_add_act(out, self.conv3, self.bn3, x, self.downsample, tail)
    out = self.aa(fnn.conv_bn_act(x, self.conv1, self.bn1))  # BasicBlock
    return fnn.conv_bn_add_act(out, self.conv2, self.bn2, x, self.downsample, tail)


def _timm_fused(cls):
    """A subclass of a timm block class whose forward is fused (timm's own where it cannot be)."""
    if cls not in _TIMM_FUSED:
        fused = type(f"Fused{cls.__name__}", (fnn._Fused, cls), {
            "forward": _timm_fused_forward, "_fusedres_original_forward": cls.forward,
            "__module__": __name__})
        _TIMM_FUSED[cls] = fused
        _UNFUSED[fused] = cls
    return _TIMM_FUSED[cls]


def __getattr__(name: str):
    """fusedres.convert.FusedBottleneck / FusedBasicBlock: the fused timm classes are made on
    demand, and pickle (torch.save of a whole model) finds them by name, also in a process
    that has not converted anything yet."""
    if name in ("FusedBasicBlock", "FusedBottleneck"):
        import timm.models.resnet

        return _timm_fused(getattr(timm.models.resnet, name[len("Fused"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_class(module: nn.Module):
    cls = type(module)
    if cls in _FUSED:
        return _FUSED[cls]
    if (cls.__module__, cls.__name__) in _TIMM_BLOCKS:
        return _timm_fused(cls)
    return None


# ---- what runs fused ----------------------------------------------------------------------------


def describe(module: nn.Module) -> str:
    """How a converted module runs in its current mode: fused, partly, or its own forward."""
    if isinstance(module, tv.ResNet):
        reason = fnn.plain_reason([("bn1", module.bn1)], [("relu", module.relu)])
        return f"stem runs unfused ({reason})" if reason else "stem fused (conv1 + bn1 + relu)"
    if type(module) in _TIMM_FUSED.values():
        reason = _timm_plain_reason(module)
        if reason:
            return f"timm's own forward ({reason})"
        between = [name for name in ("se", "drop_path")
                   if not fnn.is_identity(getattr(module, name))]
        if between:
            return (f"fused, except the residual add + ReLU: {' and '.join(between)} run between "
                    f"the last BN and the add")
        if module.drop_path is not None:
            return (f"fused (drop_path is the identity now; in training with drop_prob "
                    f"{module.drop_path.drop_prob} the add + ReLU is a separate pass)")
        return "fused"
    reason = fnn._block_plain_reason(module)
    return f"torchvision's own forward ({reason})" if reason else "fused"


def convert(model: nn.Module, inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Gives the torchvision ResNet blocks of `model` (and the ResNet around them) and timm's
    ResNet blocks a fused forward, in place, and returns `model` itself. The modules keep
    their parameters, buffers, state_dict keys and hooks: only their class (their forward)
    changes, so an optimizer or EMA copy built before convert() keeps training the converted
    model. Modules it does not recognise are left as they are. With verbose, prints each
    converted module and how it runs (fused, partly fused, or its own forward, and why)."""
    _check_module(model, "convert")
    if inplace is not True:
        raise ValueError(
            "fusedres.convert works in place (as torch's convert_sync_batchnorm), so that "
            "optimizers and EMA copies built before it keep training the converted model; for a "
            "converted copy use fusedres.convert(copy.deepcopy(model))")
    converted = []
    for name, module in model.named_modules():
        fused = _fused_class(module)
        if fused is not None:
            module.__class__ = fused  # same attributes: only forward changes
            converted.append((name or "(model)", module))
    if verbose:
        _report(model, converted)
    return model


def _report(model, converted) -> None:
    blocks = [describe(m) for _, m in converted if not isinstance(m, tv.ResNet)]
    own = sum("own forward" in text for text in blocks)
    fused = sum(text == "fused" or text.startswith("fused (") for text in blocks)
    print(f"fusedres.convert: {len(converted)} module(s) converted; of {len(blocks)} block(s) "
          f"({'training' if model.training else 'eval'} mode): {fused} fused, "
          f"{len(blocks) - fused - own} partly fused, {own} running their own forward")
    for name, module in converted:
        print(f"  {name}: {type(module).__name__}, {describe(module)}")
    inside = {id(m) for _, c in converted for m in c.modules()}
    left = [n for n, m in model.named_modules()
            if id(m) not in inside and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        print(f"  not fused (outside the converted modules): {len(left)} BN module(s): "
              f"{', '.join(left[:4])}{', ...' if len(left) > 4 else ''}")


def unconvert(model: nn.Module) -> nn.Module:
    """The reverse of convert, in place: fused blocks and ResNets become torchvision's (or
    timm's) own classes again, with the same state; returns `model`. (fusedres.ResNet50()
    built with stride_in_1x1=True keeps the stride in its 1x1 convolutions.)"""
    _check_module(model, "unconvert")
    for module in model.modules():
        plain = _UNFUSED.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model


def _check_module(model, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.{function}: model must be an nn.Module, got "
                        f"{type(model).__name__}")


# ---- fold_bn ----------------------------------------------------------------------------------


def _foldable_bn(module: nn.Module) -> bool:
    # nn.SyncBatchNorm is a plain BN in eval; a BN subclass with its own forward (timm's
    # BatchNormAct2d applies an activation too) is not.
    return fnn.is_batch_norm(module) or type(module) is nn.SyncBatchNorm


def _conv_bn_attributes(module: nn.Module):
    """(conv, BN) attribute names of a module whose forward calls the BN right after the conv."""
    cls = type(module)
    if isinstance(module, (tv.BasicBlock, tv.Bottleneck)) and (
            cls in (tv.BasicBlock, tv.Bottleneck) or cls in _UNFUSED):
        return [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    if cls in (tv.ResNet, models.ResNet):
        return [("conv1", "bn1")]
    plain = _UNFUSED.get(cls, cls)
    if (plain.__module__, plain.__name__) in _TIMM_BLOCKS:
        return [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    if (plain.__module__, plain.__name__) == ("timm.models.resnet", "ResNet"):
        return [("conv1", "bn1")]  # the stem (conv1 may be a deep stem ending in a conv)
    return []


def _pairs(model: nn.Module):
    """(parent, conv, BN attribute name, BN's full name) for every BN right after a conv."""
    pairs = []
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        for conv_name, bn_name in _conv_bn_attributes(module):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
                conv = conv[-1]
            if isinstance(conv, nn.Conv2d) and bn is not None and _foldable_bn(bn):
                pairs.append((module, conv, bn_name, prefix + bn_name))
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, first), (bn_name, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and _foldable_bn(second):
                    pairs.append((module, first, bn_name, prefix + bn_name))
    return pairs


def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    weight, bias = fold_conv_bn(conv.weight.detach(),
                                None if conv.bias is None else conv.bias.detach(),
                                bn.running_mean, bn.running_var, bn.eps,
                                None if bn.weight is None else bn.weight.detach(),
                                None if bn.bias is None else bn.bias.detach())
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference model with each BatchNorm (or FrozenBatchNorm2d) that directly follows a
    convolution folded into it and replaced by nn.Identity: in fusedres / torchvision / timm
    ResNet blocks and stems, and in nn.Sequential(conv, bn, ...) runs. The model must be in
    eval mode. Returns a new model (the argument is left as it is) unless inplace=True; the
    result is a plain snapshot of the current weights, with nothing cached. BNs it cannot fold
    (not after a convolution in a module whose forward it knows, or with a hook or
    parametrization in the way) stay, and a warning names them."""
    _check_module(model, "fold_bn")
    if model.training:
        raise RuntimeError("fusedres.fold_bn: the model is in training mode, whose BatchNorm uses "
                           "batch statistics and cannot be folded; call model.eval() first")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as e:  # e.g. a pruned convolution's computed (non-leaf) weight
            raise RuntimeError(f"fusedres.fold_bn: the model cannot be deep-copied ({e}); fold "
                               f"it in place with fold_bn(model, inplace=True)") from e
    pairs = []
    for module, conv, bn_name, name in _pairs(model):
        bn = getattr(module, bn_name)
        if bn.running_mean is None or bn.running_var is None:  # check all before changing any
            raise ValueError(f"fusedres.fold_bn: {name} has no running statistics "
                             "(track_running_stats=False: it normalises with the batch's "
                             "statistics in eval mode too) and cannot be folded")
        # A pruning / weight_norm hook recomputes conv.weight at each call, a parametrization
        # computes it: either would undo or refuse the folded weight.
        if not (fnn._hooked(conv) or fnn._hooked(bn) or parametrize.is_parametrized(conv)):
            pairs.append((module, conv, bn_name))
    for module, conv, bn_name in pairs:
        _fold_pair(conv, getattr(module, bn_name))
        setattr(module, bn_name, nn.Identity())
    left = [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or fnn._is_frozen(m)]
    if left:
        warnings.warn(
            f"fusedres.fold_bn: {len(left)} normalization layer(s) left unfolded (not a plain "
            f"BatchNorm directly after a convolution in a module fold_bn knows, or a hook or "
            f"parametrization on it or its convolution): "
            f"{', '.join(left[:6])}{', ...' if len(left) > 6 else ''}",
            UserWarning, stacklevel=2)
    return model
