"""ResNet-family models built from the fused blocks of fusedres.nn.

fusedres.ResNet is torchvision.models.ResNet with a fused forward; the constructors are
torchvision's own (same keyword arguments, `weights=` / `progress=` loading torchvision's
weights, offline when the file is in torch's hub cache), followed by fusedres.convert:

    model = fusedres.resnet50(weights="IMAGENET1K_V2")
    model = fusedres.get_model("resnext50_32x4d", num_classes=10)
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torchvision
import torchvision.models.resnet as tv
from torch import Tensor, nn

from . import preact
from .nn import (BasicBlock, Bottleneck, _Fused, check_input, conv_bn_act, folded_on_cpu,
                 move_stride_to_1x1, plain_reason)

# torchvision's builders that fusedres offers, as (lowercase name, capitalised alias).
_BUILDERS = {
    "resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50",
    "resnet101": "ResNet101", "resnet152": "ResNet152", "resnext50_32x4d": "ResNeXt50_32x4d",
    "resnext101_32x8d": "ResNeXt101_32x8d", "resnext101_64x4d": "ResNeXt101_64x4d",
    "wide_resnet50_2": "WideResNet50_2", "wide_resnet101_2": "WideResNet101_2",
}

__all__ = ["ResNet", "get_model", "list_models", *_BUILDERS, *_BUILDERS.values()]


class ResNet(_Fused, tv.ResNet):
    """torchvision.models.ResNet with fused blocks (same arguments, same state_dict), plus
    stride_in_1x1 for the original ResNet v1 bottleneck."""

    def __init__(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        stride_in_1x1: bool = False,
    ) -> None:
        if stride_in_1x1 and not issubclass(block, tv.Bottleneck):
            raise ValueError("stride_in_1x1 applies to Bottleneck blocks only")
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer)
        self.stride_in_1x1 = False
        if stride_in_1x1:
            set_stride_in_1x1(self)

    def forward(self, x: Tensor) -> Tensor:
        if plain_reason([("bn1", self.bn1)], [("relu", self.relu)]) is not None:
            return super().forward(x)
        check_input(self, x, self.conv1)
        if folded_on_cpu([("bn1", self.bn1)], x):
            return super().forward(x)
        x = conv_bn_act(x, self.conv1, self.bn1)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def set_stride_in_1x1(model: tv.ResNet) -> None:
    """Moves the stride of every downsampling Bottleneck into its first 1x1 convolution."""
    if getattr(model, "stride_in_1x1", False):
        return
    blocks = [m for m in model.modules() if isinstance(m, tv.Bottleneck)]
    if not blocks:
        raise ValueError("stride_in_1x1 applies to Bottleneck blocks only")
    for block in blocks:
        move_stride_to_1x1(block)
    model.stride_in_1x1 = True


def _builder(name: str, alias: str):
    """fusedres's `name`: torchvision's builder (its weights handling included), converted."""

    def build(*, weights=None, progress: bool = True, stride_in_1x1: bool = False,
              **kwargs) -> ResNet:
        from .convert import convert

        model = convert(getattr(torchvision.models, name)(weights=weights, progress=progress,
                                                          **kwargs))
        if stride_in_1x1:
            set_stride_in_1x1(model)
        return model

    build.__name__ = build.__qualname__ = alias
    build.__doc__ = (f"torchvision.models.{name} (same arguments: weights, progress, "
                     f"num_classes, norm_layer, ...), fused; stride_in_1x1=True puts the "
                     f"downsampling stride in the first 1x1 (the original ResNet v1).")
    return build


resnet18 = ResNet18 = _builder("resnet18", "ResNet18")
resnet34 = ResNet34 = _builder("resnet34", "ResNet34")
resnet50 = ResNet50 = _builder("resnet50", "ResNet50")
resnet101 = ResNet101 = _builder("resnet101", "ResNet101")
resnet152 = ResNet152 = _builder("resnet152", "ResNet152")
resnext50_32x4d = ResNeXt50_32x4d = _builder("resnext50_32x4d", "ResNeXt50_32x4d")
resnext101_32x8d = ResNeXt101_32x8d = _builder("resnext101_32x8d", "ResNeXt101_32x8d")
resnext101_64x4d = ResNeXt101_64x4d = _builder("resnext101_64x4d", "ResNeXt101_64x4d")
wide_resnet50_2 = WideResNet50_2 = _builder("wide_resnet50_2", "WideResNet50_2")
wide_resnet101_2 = WideResNet101_2 = _builder("wide_resnet101_2", "WideResNet101_2")


def list_models() -> list[str]:
    """The model names fusedres builds (get_model's names): torchvision's ResNets, then the
    pre-activation ResNets (v2) of fusedres.preact."""
    return list(_BUILDERS) + list(preact.BUILDERS)


def get_model(name: str, **kwargs) -> Union[ResNet, preact.PreActResNet]:
    """torchvision.models.get_model(name, **kwargs) for a ResNet-family name, fused; or a
    pre-activation ResNet ("preact_resnet50", ...: fusedres.preact_resnet50(**kwargs))."""
    key = name.lower() if isinstance(name, str) else name
    if key in preact.BUILDERS:
        return getattr(preact, key)(**kwargs)
    if key not in _BUILDERS:
        raise ValueError(f"fusedres.get_model: {name!r} is not a ResNet fusedres builds; choose "
                         f"from {', '.join(list_models())}")
    return _builder(key, _BUILDERS[key])(**kwargs)
