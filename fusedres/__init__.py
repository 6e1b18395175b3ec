"""fusedres: fused BatchNorm / ReLU / residual kernels for ResNets in PyTorch.

    import fusedres
    fusedres.info()                              # what was built, loaded, and is active
    fusedres.functional.batch_norm_relu(...)     # the fused ops
    with fusedres.backend("reference"): ...      # pick an implementation
    fusedres.freeze(model.eval())                # CPU inference: BN folded, weights prepacked
"""
from . import _extension  # noqa: F401  (loads the compiled ops; warns if it cannot)
from . import functional, nn, preact
from ._backend import BACKENDS, backend, get_backend, info, set_backend
from .convert import convert, fold_bn, unconvert
from .frozen import freeze
from .sync_batchnorm import convert_sync_batchnorm
from .models import (ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152, ResNeXt50_32x4d,
                     ResNeXt101_32x8d, ResNeXt101_64x4d, WideResNet50_2, WideResNet101_2,
                     get_model, list_models, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
                     wide_resnet101_2)
from .preact import (PreActResNet, PreActResNet18, PreActResNet34, PreActResNet50,
                     PreActResNet101, PreActResNet152, preact_resnet18, preact_resnet34,
                     preact_resnet50, preact_resnet101, preact_resnet152)

__version__ = "0.1.0"

__all__ = ["functional", "nn", "preact", "BACKENDS", "backend", "get_backend", "info",
           "set_backend", "convert", "unconvert", "fold_bn", "freeze", "convert_sync_batchnorm",
           "get_model", "list_models",
           "ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152",
           "ResNeXt50_32x4d", "ResNeXt101_32x8d", "ResNeXt101_64x4d", "WideResNet50_2",
           "WideResNet101_2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2", "PreActResNet", "PreActResNet18", "PreActResNet34",
           "PreActResNet50", "PreActResNet101", "PreActResNet152", "preact_resnet18",
           "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]
