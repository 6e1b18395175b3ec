"""fusedres.freeze (this module: fusedres.frozen): an inference-only snapshot of a model for
the CPU, with BN folded into the convolutions and each convolution's weight reordered once into
oneDNN's blocked layout.

Plain `fold_bn` leaves ordinary convolution weights, which oneDNN reorders on every call;
Inductor's CPU freezing path gets much of its speed from doing that once ("prepacking"). A
prepacked weight is a cache of the weight, and a cache goes stale silently when the weight is
written through `.data` (no version bump), so it is offered only here, with frozen-model
semantics as torch.jit.freeze has them: the frozen model is a new model that no longer has the
convolutions' weights as parameters, and changing the original afterwards does not change it.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import nn as fnn
from .convert import _check_module, fold_bn, unconvert


def available() -> bool:
    """True if this torch has oneDNN (mkldnn) convolutions with prepacked weights."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


_SHAPES_KEPT = 8  # input shapes a PackedConv2d keeps a reordered weight for


class PackedConv2d(nn.Module):
    """An nn.Conv2d frozen for CPU inference: its weight reordered once for oneDNN. It has no
    parameters (a packed weight is not a tensor torch can save, move or train): it keeps a
    private dense copy of the weight, which pickles and deep-copies, and the weight reordered
    for each input shape it sees."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self._dense = (conv.weight.detach().clone(),
                       None if conv.bias is None else conv.bias.detach().clone())
        self._geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        self._packed: dict = {}

    def _weight_for(self, x: Tensor) -> Tensor:
        """The weight reordered for inputs of x's shape: oneDNN picks the blocked layout for
        the input size it is told (measured: ResNet-50 at batch 8, 224x224, about 5% faster
        than one layout for all sizes). A few shapes are kept; the oldest goes first."""
        key = tuple(x.shape)
        packed = self._packed.get(key)
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self._dense[0].to_mkldnn(), *self._geometry, list(key))
            kept = dict(list(self._packed.items())[1 - _SHAPES_KEPT:])
            kept[key] = packed
            self._packed = kept  # (replaced, never changed: another thread may be reading it)
        return packed

    def __getstate__(self):
        return {**self.__dict__, "_packed": {}}  # (oneDNN tensors cannot be pickled)

    @property
    def dtype(self) -> torch.dtype:
        return self._dense[0].dtype

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, dtype={self.dtype}, prepacked for oneDNN")

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.device.type != "cpu":
            raise RuntimeError(
                f"fusedres.freeze: a frozen convolution takes a 4-D CPU tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                f"{' on ' + str(x.device) if isinstance(x, Tensor) else ''}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"fusedres.freeze: a frozen convolution with {self.in_channels} "
                             f"input channels got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            # Under autocast the frozen model keeps the dtype it was frozen in (freeze a
            # bfloat16 model for bfloat16 convolutions); outside it a mismatch is an error.
            if not torch.is_autocast_enabled("cpu"):
                raise TypeError(f"fusedres.freeze: the model was frozen in {self.dtype}, got "
                                f"input of {x.dtype}; freeze a model of the input's dtype")
            x = x.to(self.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("fusedres.freeze: a frozen model is for inference only (its "
                               "convolutions have no backward); differentiate the unfrozen "
                               "model, or run under torch.no_grad()")
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._weight_for(x), self._dense[1], *self._geometry, "none", [], "")


def _packable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not fnn._hooked(conv)
            and not parametrize.is_parametrized(conv)
            and conv.weight.dtype in (torch.float32, torch.bfloat16))


def freeze(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference-only snapshot of an eval `model`: fold_bn's result (BN folded into the
    convolutions), and for a model on the CPU with oneDNN also: the fused classes made
    torchvision's / timm's own again (a folded block runs their forward on the CPU anyway) and
    every plain float32 / bfloat16 nn.Conv2d replaced by a PackedConv2d, whose weight oneDNN
    reorders once per input shape. Returns a new model unless inplace=True. The frozen model
    does not see later changes to `model`'s weights (freeze again after training), has no
    convolution parameters in its state_dict, and refuses to build a graph for backward.
    Elsewhere (a GPU model, no oneDNN) it is fold_bn's result, whose fused epilogues run there."""
    _check_module(model, "freeze")
    model = fold_bn(model, inplace=inplace)
    tensors = itertools.chain(model.parameters(), model.buffers())
    if not available() or any(t.device.type != "cpu" for t in tensors):
        return model
    unconvert(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and _packable(child):
                setattr(parent, name, PackedConv2d(child))
    return model
