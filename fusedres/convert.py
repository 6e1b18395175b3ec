"""convert() / unconvert(): torchvision and timm ResNets (v1, and the pre-activation v2 of
fusedres.preact and timm's ResNetV2 with BatchNorm) with a fused forward and back, in place;
fold_bn(): an inference model with every BatchNorm folded into the convolution before it.

convert() and unconvert() only change the class of the blocks (and of torchvision's ResNet),
as torch's own convert_sync_batchnorm changes modules in place: parameters, buffers,
state_dict keys, hooks, and any optimizer or EMA copy built beforehand stay valid.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torchvision.models.resnet as tv
from torch import nn
from torch.nn.utils import parametrize

from . import models
from . import nn as fnn
from . import preact
from .functional import fold_conv_bn

__all__ = ["convert", "unconvert", "fold_bn", "describe"]

# torchvision / fusedres plain class -> fused class with the same submodules and attributes
_FUSED = {tv.BasicBlock: fnn.BasicBlock, tv.Bottleneck: fnn.Bottleneck, tv.ResNet: models.ResNet,
          **preact.FUSED}
_TIMM_FUSED: dict = {}  # timm class -> its fused subclass
_UNFUSED = {fused: plain for plain, fused in _FUSED.items()}
_PREACT_BLOCKS = (preact.PlainPreActBasicBlock, preact.PlainPreActBottleneck)


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


# ---- timm's ResNetV2 (pre-activation) ----------------------------------------------------------


def _is_timm_bn_act(norm: nn.Module) -> bool:
    """timm's BatchNormAct2d (BN, then its `drop` and `act` modules; its forward is
    nn.BatchNorm2d's, copied), not a subclass with a forward of its own."""
    cls = type(norm)
    return (cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")
            and isinstance(norm, nn.BatchNorm2d))


def _timm_bn_relu_reason(name: str, norm: nn.Module):
    """Why timm's norm + act module `norm` cannot run as one fused BN + ReLU (None: it can)."""
    if not _is_timm_bn_act(norm):
        return f"{name} is {type(norm).__name__}, not a BatchNormAct2d the fused ops implement"
    if type(norm.act) is not nn.ReLU:
        return f"{name}.act is {type(norm.act).__name__}, not nn.ReLU"
    if not isinstance(norm.drop, nn.Identity):
        return f"{name}.drop is {type(norm.drop).__name__}, not nn.Identity"
    for m, what in ((norm, name), (norm.act, f"{name}.act"), (norm.drop, f"{name}.drop")):
        if fnn._hooked(m):
            return f"{what} has a hook"
    return None


def _timm_v2_norms(module: nn.Module) -> list:
    return [(name, m) for name, m in module._modules.items() if name.startswith("norm")]


def _timm_v2_plain_reason(block):
    """Why a timm ResNetV2 pre-activation block must run timm's forward right now (None: the
    fused one runs). DropPath does not stop the fusion (it runs before the add, as a module)."""
    reason = fnn.plain_reason([], [])  # tracing, global hooks
    for name, norm in _timm_v2_norms(block):
        reason = reason or _timm_bn_relu_reason(name, norm)
    return reason


def _timm_v2_parts(block):
    """(norms, convs) of a timm pre-activation block."""
    if hasattr(block, "conv3"):  # PreActBottleneck
        return (block.norm1, block.norm2, block.norm3), (block.conv1, block.conv2, block.conv3)
    return (block.norm1, block.norm2), (block.conv1, block.conv2)  # PreActBasic


def _timm_v2_fused_forward(self, x):
    if _timm_v2_plain_reason(self) is not None:
        return self._fusedres_original_forward(x)
    fnn.check_input(self, x, self.conv1)
    norms, convs = _timm_v2_parts(self)
    return preact.preact_forward(x, norms, convs, self.downsample, (self.drop_path,))


def _timm_v2_branch(block):
    """block before its add, as preact.run_chained takes it."""
    norms, convs = _timm_v2_parts(block)
    return functools.partial(preact.preact_branch, norms=norms, convs=convs,
                             downsample=block.downsample, tail=(block.drop_path,))


def _timm_v2_chained_blocks(model):
    """The blocks of a converted ResNetV2, if forward_features may run them itself (as
    PreActResNet.chained_blocks): timm's own stage modules without gradient checkpointing,
    no hook on the stages or blocks, every block fused, the final norm a fused BN + ReLU, some
    BN after an add in training. None otherwise."""
    if type(model.stages) is not nn.Sequential or fnn._hooked(model.stages):
        return None
    blocks = []
    for stage in model.stages:
        if (_timm_key(type(stage)) != ("timm.models.resnetv2", "ResNetStage")
                or getattr(stage, "grad_checkpointing", True) or fnn._hooked(stage)
                or type(stage.blocks) is not nn.Sequential or fnn._hooked(stage.blocks)):
            return None
        for block in stage.blocks:
            if (getattr(type(block), "forward", None) is not _timm_v2_fused_forward
                    or fnn._hooked(block)):
                return None
            blocks.append(block)
    following = [b.norm1 for b in blocks[1:]] + [model.norm]
    if not blocks or not any(_is_timm_bn_act(bn) and fnn._bn_training(bn) for bn in following):
        return None
    if _timm_bn_relu_reason("norm", model.norm) is not None or any(
            _timm_v2_plain_reason(b) is not None for b in blocks):
        return None
    return blocks


def _timm_v2_forward_features(self, x):
    """ResNetV2.forward_features with each BN + ReLU of the stem and the final norm fused
    (the blocks are converted modules of their own); in training, where
    _timm_v2_chained_blocks allows, each block's add fused with the BN + ReLU after it
    (preact.run_chained)."""
    if fnn.plain_reason([], []) is not None:
        return self._fusedres_original_forward_features(x)
    for name, m in self.stem.named_children():
        x = preact.bn_relu(x, m) if _timm_bn_relu_reason(name, m) is None else m(x)
    blocks = _timm_v2_chained_blocks(self)
    if blocks is not None:
        return preact.run_chained(x, [_timm_v2_branch(b) for b in blocks],
                                  [b.norm1 for b in blocks[1:]] + [self.norm])
    x = self.stages(x)
    return preact.bn_relu(x, self.norm) if _timm_bn_relu_reason("norm", self.norm) is None \
        else self.norm(x)


# (module, class name) of a timm class -> the methods of its fused subclass
_TIMM_FORWARDS = {
    ("timm.models.resnet", "BasicBlock"): {"forward": _timm_fused_forward},
    ("timm.models.resnet", "Bottleneck"): {"forward": _timm_fused_forward},
    ("timm.models.resnetv2", "PreActBasic"): {"forward": _timm_v2_fused_forward},
    ("timm.models.resnetv2", "PreActBottleneck"): {"forward": _timm_v2_fused_forward},
    ("timm.models.resnetv2", "ResNetV2"): {"forward_features": _timm_v2_forward_features},
}


def _timm_key(cls):
    return cls.__module__, cls.__name__


def _timm_fused(cls):
    """A subclass of a timm class whose forward (ResNetV2: forward_features) is fused (timm's
    own where it cannot be); the original stays as _fusedres_original_<name>."""
    if cls not in _TIMM_FUSED:
        methods = _TIMM_FORWARDS[_timm_key(cls)]
        namespace = {"__module__": __name__, **methods}
        for method in methods:
            namespace[f"_fusedres_original_{method}"] = getattr(cls, method)
        fused = type(f"Fused{cls.__name__}", (fnn._Fused, cls), namespace)
        _TIMM_FUSED[cls] = fused
        _UNFUSED[fused] = cls
    return _TIMM_FUSED[cls]


def __getattr__(name: str):
    """fusedres.convert.FusedBottleneck, FusedPreActBottleneck, FusedResNetV2, ...: the fused
    timm classes are made on demand, and pickle (torch.save of a whole model) finds them by
    name, also in a process that has not converted anything yet."""
    for module_name, class_name in _TIMM_FORWARDS:
        if name == f"Fused{class_name}":
            import importlib

            return _timm_fused(getattr(importlib.import_module(module_name), class_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _timm_v2_left_reason(module: nn.Module):
    """Why convert() leaves a timm ResNetV2 module (block or model) as it is: a norm layer
    that is not BatchNorm (the BiT models' GroupNorm, with weight-standardised convolutions).
    None for any other module."""
    key = _timm_key(type(module))
    if key[0] != "timm.models.resnetv2" or key not in _TIMM_FORWARDS:
        return None
    norms = _timm_v2_norms(module) if key[1] != "ResNetV2" else [("norm", module.norm)]
    for name, norm in norms:
        if not isinstance(norm, nn.BatchNorm2d):
            bit = ("; a BiT model: GroupNorm and weight-standardised convolutions"
                   if "GroupNorm" in type(norm).__name__ else "")
            return f"{name} is {type(norm).__name__}, not BatchNorm{bit}"
    return None


def _fused_class(module: nn.Module):
    cls = type(module)
    if cls in _FUSED:
        return _FUSED[cls]
    if _timm_key(cls) in _TIMM_FORWARDS and _timm_v2_left_reason(module) is None:
        return _timm_fused(cls)
    return None


# ---- what runs fused ----------------------------------------------------------------------------


def _is_model(module: nn.Module) -> bool:
    """A whole ResNet (torchvision's, fusedres's pre-activation one, timm's ResNetV2), as
    opposed to a block."""
    plain = _UNFUSED.get(type(module), type(module))
    return (isinstance(module, (tv.ResNet, preact.PlainPreActResNet))
            or _timm_key(plain) == ("timm.models.resnetv2", "ResNetV2"))


def describe(module: nn.Module) -> str:
    """How a converted module runs in its current mode: fused, partly, or its own forward
    (and, for a timm ResNetV2 module convert() leaves as it is, why)."""
    left = _timm_v2_left_reason(module)
    if left is not None:
        return f"timm's own forward, not converted ({left})"
    if isinstance(module, tv.ResNet):
        reason = fnn.plain_reason([("bn1", module.bn1)], [("relu", module.relu)])
        return f"stem runs unfused ({reason})" if reason else "stem fused (conv1 + bn1 + relu)"
    if isinstance(module, preact.PlainPreActResNet):
        reason = preact.model_plain_reason(module)
        return (f"final_bn + relu unfused ({reason})" if reason
                else "final_bn + relu fused (the stem has no BN)")
    if isinstance(module, _PREACT_BLOCKS):
        reason = preact._block_plain_reason(module)
        return f"its own forward, unfused ({reason})" if reason else "fused"
    plain = _UNFUSED.get(type(module), type(module))
    if _timm_key(plain) == ("timm.models.resnetv2", "ResNetV2"):
        reason = fnn.plain_reason([], [])
        if reason:
            return f"timm's own forward_features ({reason})"
        norms = [(f"stem.{n}", m) for n, m in module.stem.named_children()
                 if isinstance(m, nn.BatchNorm2d)] + [("norm", module.norm)]
        unfused = [r for r in (_timm_bn_relu_reason(n, m) for n, m in norms) if r]
        fused = f"{len(norms) - len(unfused)} of the stem's and final BN + ReLU fused"
        return f"{fused}; unfused: {'; '.join(unfused)}" if unfused else fused
    if _timm_key(plain)[0] == "timm.models.resnetv2":
        reason = _timm_v2_plain_reason(module)
        return f"timm's own forward ({reason})" if reason else "fused"
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
    """Gives the torchvision ResNet blocks of `model` (and the ResNet around them), the
    plain pre-activation modules of fusedres.preact, timm's ResNet blocks and timm's ResNetV2
    (its pre-activation blocks and the model, for BN + ReLU in the stem and the final norm) a
    fused forward, in place, and returns `model` itself. The modules keep their parameters,
    buffers, state_dict keys and hooks: only their class (their forward) changes, so an
    optimizer or EMA copy built before convert() keeps training the converted model. Modules
    it does not recognise are left as they are, and so are timm's ResNetV2 modules whose norm
    layers are not BatchNorm (the BiT models: GroupNorm, weight-standardised convolutions).
    With verbose, prints each converted module and how it runs (fused, partly fused, or its
    own forward, and why), and each ResNetV2 module left as it is and why."""
    _check_module(model, "convert")
    if inplace is not True:
        raise ValueError(
            "fusedres.convert works in place (as torch's convert_sync_batchnorm), so that "
            "optimizers and EMA copies built before it keep training the converted model; for a "
            "converted copy use fusedres.convert(copy.deepcopy(model))")
    converted, left = [], []
    for name, module in model.named_modules():
        fused = _fused_class(module)
        if fused is not None:
            module.__class__ = fused  # same attributes: only forward changes
            converted.append((name or "(model)", module))
        elif _timm_v2_left_reason(module) is not None:
            left.append((name or "(model)", module))
    if verbose:
        _report(model, converted, left)
    return model


def _report(model, converted, left=()) -> None:
    blocks = [describe(m) for _, m in converted if not _is_model(m)]
    own = sum("own forward" in text for text in blocks)
    fused = sum(text == "fused" or text.startswith("fused (") for text in blocks)
    print(f"fusedres.convert: {len(converted)} module(s) converted; of {len(blocks)} block(s) "
          f"({'training' if model.training else 'eval'} mode): {fused} fused, "
          f"{len(blocks) - fused - own} partly fused, {own} running their own forward")
    for name, module in converted:
        print(f"  {name}: {type(module).__name__}, {describe(module)}")
    if left:
        print(f"  left as they are: {len(left)} timm ResNetV2 module(s) whose norm layers are "
              f"not BatchNorm")
        for name, module in left:
            print(f"  {name}: {type(module).__name__}, {describe(module)}")
    inside = {id(m) for _, c in converted for m in c.modules()}
    outside = [n for n, m in model.named_modules()
               if id(m) not in inside and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if outside:
        print(f"  not fused (outside the converted modules): {len(outside)} BN module(s): "
              f"{', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}")


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
    if cls in (preact.PlainPreActBottleneck, preact.PreActBottleneck):
        return [("conv1", "bn2"), ("conv2", "bn3")]  # bn1 precedes conv1, a ReLU between
    if cls in (preact.PlainPreActBasicBlock, preact.PreActBasicBlock):
        return [("conv1", "bn2")]
    plain = _UNFUSED.get(cls, cls)
    if _timm_key(plain) in (("timm.models.resnet", "BasicBlock"),
                            ("timm.models.resnet", "Bottleneck")):
        return [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    if _timm_key(plain) == ("timm.models.resnet", "ResNet"):
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


def _preactivation_bns(model: nn.Module) -> set:
    """ids of the BNs of fusedres's pre-activation modules that no convolution precedes (each
    block's bn1, the model's final_bn): nothing to fold them into (a ReLU separates them from
    the convolution after them), and in eval they run as one fused affine + ReLU pass."""
    ids = set()
    for module in model.modules():
        if type(module) in (*_PREACT_BLOCKS, preact.PreActBasicBlock, preact.PreActBottleneck):
            ids.add(id(module.bn1))
        elif type(module) in (preact.PlainPreActResNet, preact.PreActResNet):
            ids.add(id(module.final_bn))
    return ids


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
    parametrization in the way) stay, and a warning names them. In a pre-activation ResNet
    (fusedres.preact) bn2 / bn3 fold into conv1 / conv2; each block's bn1 and the final_bn
    follow no convolution and stay, without a warning (they run as fused affine + ReLU)."""
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
    preactivations = _preactivation_bns(model)
    left = [name for name, m in model.named_modules()
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) or fnn._is_frozen(m))
            and id(m) not in preactivations]
    if left:
        warnings.warn(
            f"fusedres.fold_bn: {len(left)} normalization layer(s) left unfolded (not a plain "
            f"BatchNorm directly after a convolution in a module fold_bn knows, or a hook or "
            f"parametrization on it or its convolution): "
            f"{', '.join(left[:6])}{', ...' if len(left) > 6 else ''}",
            UserWarning, stacklevel=2)
    return model
