"""ResNet building blocks whose forward runs the fused ops of the active backend.

The blocks are torchvision's own classes (fusedres.nn.BasicBlock subclasses
torchvision.models.resnet.BasicBlock, ...): same submodules, arguments and state_dict, and
`isinstance(block, torchvision.models.resnet.BasicBlock)` holds. Only the forward changes:

- training BN: the convolution (called as a module), then one fused BN (+ residual) (+ ReLU)
  op; a projection shortcut uses the dual form relu(bn3(conv3(x)) + bn_ds(conv_ds(identity)));
- eval / frozen BN: the convolution (called as a module), then one fused pass applying the BN
  as a per-channel affine (+ residual, + the shortcut's BN) (+ ReLU). Nothing is cached: the
  BN's tensors are read at every call, so writes through `.data`, load_state_dict, EMA updates
  or BN recalibration always show in the next output;
- a BN replaced by nn.Identity (fusedres.fold_bn): the convolution with its own bias and the
  fused bias (+ residual) + ReLU epilogue.

A block runs torchvision's own (unfused) forward instead whenever the fused one would hide
something a user or a tool expects to see (`runs_plain`): a hook on one of its BN / ReLU /
downsample modules (or a global module hook), a norm layer or activation the fused ops do not
implement, FX symbolic tracing, TorchScript tracing and ONNX export (which need the ordinary
graph of ordinary modules). torch.jit.script compiles the unfused torchvision classes
(`__prepare_scriptable__`).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _backend
from . import functional as FF
from .sync_batchnorm import SyncBatchNorm2d, sync_batch_norm_act, uses_sync

__all__ = ["BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "conv_bn_act", "conv_bn_add_act",
           "runs_plain"]

conv3x3, conv1x1 = tv.conv3x3, tv.conv1x1


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
    # A parameter, not conv.weight: a parametrization would compute the weight (spectral_norm
    # would even run an extra power iteration in training).
    in_channels = getattr(conv, "in_channels", None)
    weight = conv._parameters.get("weight")
    if weight is None:  # pruned or parametrized: another parameter tells the dtype and device
        weight = next(conv.parameters(), None)
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


# ---- when the fused forward may run ------------------------------------------------------------


def _hooked(module: Optional[nn.Module]) -> bool:
    """True if calling `module` would run a hook of its own (forward, pre-forward, backward)."""
    return module is not None and bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Module hooks registered for every module (register_module_forward_hook, ...)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _tracing_for_a_graph() -> bool:
    """FX symbolic tracing, TorchScript tracing, ONNX export: tools that record the ordinary
    module graph (torch.compile / torch.export trace the fused ops themselves)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or _fx_symbolic_tracing()


def _fx_flag_tracing() -> bool:
    """Older torch's module-level flag (newer torch: is_fx_symbolic_tracing, the same test)."""
    return (getattr(torch.fx._symbolic_trace, "_is_fx_tracing_flag", False)
            and not torch.compiler.is_compiling())


# torch.fx.symbolic_trace is running (not torch.compile / torch.export, which set the same
# flag); chosen once here, as it is asked on every block's forward.
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                               _fx_flag_tracing)


def is_batch_norm(norm: nn.Module) -> bool:
    """A norm layer the fused ops implement exactly: nn.BatchNorm2d (not a subclass with its
    own forward, such as nn.SyncBatchNorm or timm's BatchNormAct2d), fusedres's
    SyncBatchNorm2d, or a FrozenBatchNorm2d (torchvision, timm, detectron2: a fixed affine)."""
    if isinstance(norm, SyncBatchNorm2d):
        return True
    if isinstance(norm, nn.BatchNorm2d):
        return type(norm).forward is nn.BatchNorm2d.forward
    return _is_frozen(norm)


def _is_frozen(norm: nn.Module) -> bool:
    return type(norm).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(norm, name) for name in ("weight", "bias", "running_mean", "running_var"))


# The usual norm classes, tested by exact type first (this runs per block call).
_FUSABLE_NORMS = frozenset((nn.BatchNorm2d, nn.Identity, SyncBatchNorm2d))


def _fusable_norm(norm: nn.Module) -> bool:
    """A BN the fused ops run, or nn.Identity (folded away by fold_bn)."""
    return type(norm) in _FUSABLE_NORMS or isinstance(norm, nn.Identity) or is_batch_norm(norm)


def plain_reason(norms, acts, others=()) -> Optional[str]:
    """Why a block with these BN-like `norms`, activations `acts` and other modules whose
    hooks must fire (`others`: downsample, ...) cannot run fused right now; None if it can."""
    if _tracing_for_a_graph():
        return "tracing for a graph (FX, TorchScript or ONNX export)"
    for name, act in acts:
        if type(act) is not nn.ReLU:
            return f"{name} is {type(act).__name__}, not nn.ReLU"
    for name, norm in norms:
        if not _fusable_norm(norm):
            return f"{name} is {type(norm).__name__}, not a BatchNorm2d the fused ops implement"
    for group in (norms, acts, others):
        for name, m in group:
            if _hooked(m):
                return f"{name} has a hook"
    if _global_hooks():
        return "a global module hook is registered"
    return None


def folded_on_cpu(norms, x: Tensor) -> bool:
    """True for a block whose BNs fold_bn has folded away, on the cpp (or reference) backend:
    there its fused conv ops are ATen's convolution with the folded bias followed by ATen's
    in-place add and ReLU, the very kernels torchvision's forward runs, which then runs
    instead, without the per-call cost of the fused ops and of the block's own checks
    (measured: about 1 ms of a 16 ms ResNet-18 forward at 32x32, batch 32). The model checks
    its input once; a block on its own then fails with PyTorch's errors."""
    return (isinstance(x, Tensor) and all(isinstance(norm, nn.Identity) for _, norm in norms)
            and _backend.resolve(x.device) in ("cpp", "reference"))


def block_norms(block: nn.Module) -> list:
    """[(name, norm)] of a torchvision block: bn1..bn3 and the downsample's BN."""
    modules = block._modules  # (not getattr: a missing bn3 would raise and catch, per call)
    norms = [(name, m) for name, m in modules.items() if name.startswith("bn")]
    return norms + downsample_norms(modules.get("downsample"))


def runs_plain(block: nn.Module, norms=None) -> bool:
    """True if a fused torchvision block must run torchvision's own forward now."""
    return _block_plain_reason(block, norms) is not None


def _block_plain_reason(block: nn.Module, norms=None) -> Optional[str]:
    modules = block._modules
    return plain_reason(block_norms(block) if norms is None else norms,
                        [("relu", modules["relu"])], [("downsample", modules.get("downsample"))])


def _ends_in_conv_norm(downsample: Optional[nn.Module]) -> bool:
    """A downsample Sequential(..., conv, norm) (torchvision's, and timm's avg-pool
    shortcut), whose conv and norm the fused forward runs itself; any other shortcut is
    called as a module."""
    return (isinstance(downsample, nn.Sequential) and len(downsample) >= 2
            and isinstance(downsample[-2], nn.Conv2d))


def downsample_norms(downsample: Optional[nn.Module]) -> list:
    """[("downsample.N", norm)] of such a downsample, else []."""
    if _ends_in_conv_norm(downsample):
        return [(f"downsample.{len(downsample) - 1}", downsample[-1])]
    return []


# ---- BN state as nn.BatchNorm2d.forward sees it ----------------------------------------------


def _bn_training(bn: nn.Module) -> bool:
    """True if bn normalises with batch statistics (training, or no running statistics)."""
    if isinstance(bn, nn.Identity) or _is_frozen(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _bn_kwargs(bn: nn.Module) -> dict:
    """Keyword arguments of the fused functions for bn, exactly as nn.BatchNorm2d.forward
    would normalise and update its buffers."""
    if not _bn_training(bn):
        return dict(running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight,
                    bias=bn.bias, training=False, momentum=0.0, eps=bn.eps,
                    num_batches_tracked=None)
    track = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if use_running else None,
        running_var=bn.running_var if use_running else None,
        weight=bn.weight, bias=bn.bias, training=True,
        momentum=bn.momentum, eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if track else None,
    )


# ---- the fused conv + BN (+ residual) (+ ReLU) ---------------------------------------------------


def _plain_conv(conv: nn.Module) -> bool:
    """A convolution the fused conv ops may run in place of conv(x): an nn.Conv2d with zero
    padding and no hook (pruning and weight_norm work through hooks; parametrizations through
    conv.weight, which the fused ops read)."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not _hooked(conv)


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under autocast, the folded convolution runs in the autocast dtype, as F.conv2d would
    (the fused ops themselves are not autocast-aware)."""
    device = x.device.type
    if not _autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), bias


def conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module, relu: bool = True) -> Tensor:
    """act(bn(conv(x))) with the fused ops; bn is one that _fusable_norm accepts."""
    if isinstance(bn, nn.Identity):  # folded by fold_bn: the conv's own bias
        if not _plain_conv(conv):
            y = conv(x)
            return torch.relu(y) if relu else y
        x, weight, bias = _autocast(x, conv.weight, conv.bias)
        if relu:
            return FF.conv_bias_relu(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                                     conv.groups)
        return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), conv.stride,
                        conv.padding, conv.dilation, conv.groups)
    y = conv(x)
    if uses_sync(bn):
        return sync_batch_norm_act(y, bn, relu=relu)
    return FF.batch_norm_relu(y, **_bn_kwargs(bn), relu=relu)


def _conv_bn_pair(downsample: Optional[nn.Module]):
    """(modules before the conv, conv, bn) of a downsample Sequential(..., conv, BN) whose BN
    the fused ops run, else None."""
    if _ends_in_conv_norm(downsample) and _fusable_norm(downsample[-1]):
        return list(downsample)[:-2], downsample[-2], downsample[-1]
    return None


def _shortcut(identity: Tensor, downsample: Optional[nn.Module]) -> Tensor:
    pair = _conv_bn_pair(downsample)
    if pair is None:
        return downsample(identity) if downsample is not None else identity
    before, conv, bn = pair
    for m in before:
        identity = m(identity)
    return conv_bn_act(identity, conv, bn, relu=False)


def is_identity(module: Optional[nn.Module]) -> bool:
    """None, nn.Identity, or a timm DropPath / DropBlock2d that is the identity now (eval, or
    a drop probability of 0)."""
    if module is None or isinstance(module, nn.Identity):
        return True
    if type(module).__name__ in ("DropPath", "DropBlock2d") and hasattr(module, "drop_prob"):
        return not module.training or not module.drop_prob
    return False


def conv_bn_add_act(x: Tensor, conv: nn.Module, bn: nn.Module, identity: Tensor,
                    downsample: Optional[nn.Module], tail=()) -> Tensor:
    """relu(tail(bn(conv(x))) + shortcut(identity)): the end of a residual block, where the
    shortcut is the identity or `downsample` (a conv + BN pair is fused as well) and `tail`
    the modules between the BN and the add (timm's SE and DropPath; none in torchvision)."""
    tail = [m for m in tail if not is_identity(m)]
    if tail:  # the BN output is needed on its own: BN, tail, then the add + ReLU
        y = conv_bn_act(x, conv, bn, relu=False)
        for m in tail:
            y = m(y)
        return FF.add_relu(y, _shortcut(identity, downsample).to(y.dtype))
    if isinstance(bn, nn.Identity):  # folded by fold_bn
        shortcut = _shortcut(identity, downsample)
        if not _plain_conv(conv):
            y = conv(x)
            return FF.add_relu(y, shortcut.to(y.dtype))
        x, weight, bias = _autocast(x, conv.weight, conv.bias)
        return FF.conv_bias_add_relu(x, weight, bias, shortcut.to(x.dtype), conv.stride,
                                     conv.padding, conv.dilation, conv.groups)
    y = conv(x)
    if uses_sync(bn):
        return sync_batch_norm_act(y, bn, _shortcut(identity, downsample).to(y.dtype))
    pair = _conv_bn_pair(downsample)
    if pair is not None and _dual_fusable(bn, pair[2]):
        before, ds_conv, ds_bn = pair
        for m in before:
            identity = m(identity)
        z = ds_conv(identity)
        a, b = _bn_kwargs(bn), _bn_kwargs(ds_bn)
        return FF.dual_batch_norm_add_relu(
            y, z.to(y.dtype), a["running_mean"], a["running_var"], b["running_mean"],
            b["running_var"], a["weight"], a["bias"], b["weight"], b["bias"], a["training"],
            a["momentum"], a["eps"], residual_momentum=b["momentum"], residual_eps=b["eps"],
            num_batches_tracked=a["num_batches_tracked"],
            residual_num_batches_tracked=b["num_batches_tracked"])
    return FF.batch_norm_add_relu(y, _shortcut(identity, downsample).to(y.dtype),
                                  **_bn_kwargs(bn))


def _dual_fusable(bn: nn.Module, ds_bn: nn.Module) -> bool:
    """Both BNs in one dual op: both batch statistics or both running statistics, no
    synchronisation, and a shortcut momentum the dual op can express (its
    residual_momentum=None means "as momentum", not a cumulative average)."""
    if isinstance(ds_bn, nn.Identity) or uses_sync(ds_bn):
        return False
    training = _bn_training(bn)
    if training != _bn_training(ds_bn):
        return False
    return not training or ds_bn.momentum is not None or bn.momentum is None


# ---- blocks ---------------------------------------------------------------------------------------


def shared_copy(module: nn.Module) -> nn.Module:
    """A new module tree with the same classes, parameters and buffers (shared, not copied)."""
    new = copy.copy(module)
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = shared_copy(child)
    return new


class _Fused:
    """What the fused torchvision classes share: TorchScript gets the unfused classes."""

    def __prepare_scriptable__(self):
        # TorchScript cannot compile the fused forward (Python ops and checks): script an
        # unfused copy that shares this module's parameters and buffers.
        from .convert import unconvert

        return unconvert(shared_copy(self))


class BasicBlock(_Fused, tv.BasicBlock):
    """torchvision's BasicBlock (same class, submodules and arguments), fused."""

    def forward(self, x: Tensor) -> Tensor:
        norms = block_norms(self)
        if folded_on_cpu(norms, x) or runs_plain(self, norms):
            return super().forward(x)
        check_input(self, x, self.conv1)
        out = conv_bn_act(x, self.conv1, self.bn1)
        return conv_bn_add_act(out, self.conv2, self.bn2, x, self.downsample)


class Bottleneck(_Fused, tv.Bottleneck):
    """torchvision's Bottleneck (ResNet v1.5: stride in the 3x3), fused. With
    stride_in_1x1=True the stride sits in the first 1x1 instead (the original ResNet v1 of the
    paper and of Keras)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, stride_in_1x1: bool = False) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        if stride_in_1x1:
            move_stride_to_1x1(self)

    def forward(self, x: Tensor) -> Tensor:
        norms = block_norms(self)
        if folded_on_cpu(norms, x) or runs_plain(self, norms):
            return super().forward(x)
        check_input(self, x, self.conv1)
        out = conv_bn_act(x, self.conv1, self.bn1)
        out = conv_bn_act(out, self.conv2, self.bn2)
        return conv_bn_add_act(out, self.conv3, self.bn3, x, self.downsample)


def move_stride_to_1x1(block: tv.Bottleneck) -> None:
    """The original ResNet v1 bottleneck: the block's stride in conv1 (1x1), not conv2 (3x3)."""
    stride = block.conv2.stride
    block.conv1.stride, block.conv2.stride = stride, (1, 1)
