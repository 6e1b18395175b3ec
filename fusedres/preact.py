"""Pre-activation ResNet (v2) of "Identity Mappings in Deep Residual Networks" (He et al.,
2016): BN and ReLU before each convolution, the shortcut a pure identity,
x_{l+1} = x_l + F(x_l).

    PreActBottleneck (PreActBasicBlock: bn1 + relu, conv1 3x3 / stride, bn2 + relu, conv2 3x3)

        x ------------------------------------------+
        |                                           |  identity shortcut
        bn1 + relu             (fused)              |
        +---------------------------------------+   |
        conv1 1x1                               |   |  or, when the shape changes,
        bn2 + relu             (fused)          |   |  downsample: a 1x1 conv (stride s)
        conv2 3x3, stride s                     |   |  of the pre-activated input
        bn3 + relu             (fused)          |   |
        conv3 1x1                               |   |
        (+) <-----------------------------------+---+
        |
        x'                     (the next block's input)

    PreActResNet: conv1 7x7 / 2, maxpool, layer1..layer4, final_bn + relu (fused), avgpool, fc

The stem has no BN of its own: the first block's bn1 + relu pre-activates its output (as in
He et al.'s resnet-pre-act.lua and timm's ResNetV2). state_dict keys: conv1.weight,
layer{1-4}.{i}.bn1 / conv1 / bn2 / conv2 (/ bn3 / conv3) / downsample.weight,
final_bn.*, fc.*.

Two classes for each: PlainPreActBasicBlock, PlainPreActBottleneck and PlainPreActResNet are
the unfused PyTorch modules (what unconvert() gives back and TorchScript compiles);
PreActBasicBlock, PreActBottleneck and PreActResNet subclass them with the same submodules
and a fused forward:

- training BN: each BN + ReLU is one fused training op (the convolutions run as modules).
  PreActResNet runs its blocks itself (`PreActResNet.stages`) so that the add ending one block
  and the BN + ReLU starting the next (or final_bn + relu) are one op,
  add_batch_norm_relu: one pass reads both addends and writes the sum (the next shortcut)
  while taking its statistics, one more writes the pre-activation. A block called on its own
  adds in a pass of its own;
- eval / frozen BN: bn1 + relu is one fused affine + ReLU pass; each BN right after a
  convolution (bn2, bn3) is a fused affine + ReLU pass after it, or, once fold_bn has folded
  it, the convolution's bias + ReLU epilogue. On the `triton` backend, bn1 + relu is applied
  by the following convolutions as their prologue (the pre-activation is never written) and
  the residual add by the last convolution as its epilogue.

A block runs its plain forward wherever the v1 blocks run torchvision's (a hook on a BN or the
ReLU, a global module hook, a norm layer or activation the fused ops do not implement, FX /
TorchScript tracing, ONNX export).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _backend
from . import functional as FF
from .nn import (_autocast_enabled, _bn_kwargs, _bn_training, _Fused, _fusable_norm, _hooked,
                 _plain_conv, check_input, conv1x1, conv3x3, conv_bn_act, is_identity,
                 plain_reason)
from .sync_batchnorm import sync_batch_norm_act, uses_sync

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet", "PlainPreActBasicBlock",
           "PlainPreActBottleneck", "PlainPreActResNet", "add_bn_relu", "bn_relu", "preact_branch",
           "preact_forward", "run_chained",
           "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
           "preact_resnet152", "PreActResNet18", "PreActResNet34", "PreActResNet50",
           "PreActResNet101", "PreActResNet152"]


# ---- the unfused modules ---------------------------------------------------------------------


class PlainPreActBasicBlock(nn.Module):
    """relu(bn1) -> conv1 3x3 (stride) -> relu(bn2) -> conv2 3x3, plus the shortcut: x, or
    downsample(relu(bn1(x))) when given (the shape changes). Unfused PyTorch."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock only supports groups=1 and base_width=64")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PlainPreActBottleneck(nn.Module):
    """relu(bn1) -> conv1 1x1 -> relu(bn2) -> conv2 3x3 (stride, groups) -> relu(bn3) ->
    conv3 1x1 (4x the planes), plus the shortcut: x, or downsample(relu(bn1(x))) when given.
    The stride sits in the 3x3, as in fb.resnet.torch's pre-activation ResNet and timm's
    ResNetV2. Unfused PyTorch."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PlainPreActResNet(nn.Module):
    """The pre-activation ResNet: conv1 7x7 / 2 (no BN: the first block pre-activates its
    output), maxpool, four stages of pre-activation blocks (the first of a stage downsamples:
    a 1x1 projection of the pre-activated input where the shape changes), final_bn + relu,
    average pool, fc. Unfused PyTorch.

    Arguments as torchvision's ResNet where they apply: block, layers, num_classes,
    zero_init_residual (zero the last convolution of each block, which then starts as the
    identity), groups and width_per_group (bottleneck only: ResNeXt / wide variants),
    norm_layer; and widths, the planes of the four stages (default (64, 128, 256, 512); the
    stem has widths[0] channels, a bottleneck stage outputs 4x its planes)."""

    def __init__(
        self,
        block: type[Union[PlainPreActBasicBlock, PlainPreActBottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        for name, value in (("layers", layers), ("widths", widths)):
            if (len(value) != 4 or not all(isinstance(v, int) and not isinstance(v, bool)
                                           and v > 0 for v in value)):
                raise ValueError(f"PreActResNet: {name} must be four positive ints, got "
                                 f"{value!r}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.groups, self.base_width = groups, width_per_group
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.final_bn = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PlainPreActBottleneck):
                    nn.init.zeros_(m.conv3.weight)
                elif isinstance(m, PlainPreActBasicBlock):
                    nn.init.zeros_(m.conv2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = conv1x1(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        self._norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, norm_layer=self._norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.final_bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# ---- the fused forward ---------------------------------------------------------------------


def bn_relu(x: Tensor, bn: nn.Module) -> Tensor:
    """relu(bn(x)) in one fused op; bn is one that plain_reason accepts (nn.Identity: a ReLU)."""
    if isinstance(bn, nn.Identity):
        return torch.relu(x)
    if uses_sync(bn):
        return sync_batch_norm_act(x, bn)
    return FF.batch_norm_relu(x, **_bn_kwargs(bn))


def add_bn_relu(x: Tensor, residual: Tensor, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(x + residual, relu(bn(x + residual))): in training one fused op, in eval the add and
    the fused affine + ReLU; bn is a BatchNorm2d that plain_reason accepts, not a
    SyncBatchNorm (see can_add_bn_relu)."""
    return FF.add_batch_norm_relu(x, residual, **_bn_kwargs(bn))


def can_add_bn_relu(x: Tensor, residual: Tensor, bn: nn.Module) -> bool:
    """True where add_bn_relu(x, residual, bn) computes what relu(bn(x + residual)) would: a
    BN not synchronised across processes (its statistics are the group's) and addends of one
    dtype and shape (the sum is written in x's dtype; an add that promotes stays an add)."""
    return not uses_sync(bn) and x.dtype == residual.dtype and x.shape == residual.shape


def preact_branch(x: Tensor, a: Optional[Tensor], norms: Sequence[nn.Module],
                  convs: Sequence[nn.Module], downsample: Optional[nn.Module],
                  tail: Sequence[nn.Module] = ()) -> tuple[Tensor, Tensor]:
    """A pre-activation block up to its add, with the fused ops: (branch, shortcut), where
    a = relu(norms[0](x)) (computed here when None: add_bn_relu gives it with x), h = a,
    then h = relu(norms[i](convs[i - 1](h))) for the inner pairs; branch = tail(convs[-1](h)),
    the shortcut x or downsample(a). `tail`: modules between the last convolution and the add
    (timm's DropPath)."""
    if a is None:
        a = bn_relu(x, norms[0])
    shortcut = x if downsample is None else downsample(a)
    h = a
    for conv, norm in zip(convs, norms[1:]):
        h = conv_bn_act(h, conv, norm)
    h = convs[-1](h)
    for m in tail:
        if not is_identity(m):
            h = m(h)
    return h, shortcut


def run_chained(x: Tensor, branches: Sequence[Callable], norms: Sequence[nn.Module]) -> Tensor:
    """Pre-activation blocks run in turn, each add fused with the BN + ReLU after it:
    branches[i](x, a) is block i before its add (preact_branch: (branch, shortcut), a its
    pre-activation or None), norms[i] the BN + ReLU after its add (the next block's first,
    the last the final one). Returns relu(norms[-1](the last block's output))."""
    a = None  # the next block's pre-activation, where add_bn_relu gave it
    for branch, bn in zip(branches, norms):
        h, shortcut = branch(x, a)
        if can_add_bn_relu(h, shortcut, bn):
            x, a = add_bn_relu(h, shortcut, bn)
        else:
            x, a = h + shortcut, None
    return a if a is not None else bn_relu(x, norms[-1])


def preact_forward(x: Tensor, norms: Sequence[nn.Module], convs: Sequence[nn.Module],
                   downsample: Optional[nn.Module], tail: Sequence[nn.Module] = ()) -> Tensor:
    """A whole pre-activation block with the fused ops: preact_branch, then the add (see
    preact_branch for the arguments)."""
    if all(is_identity(m) for m in tail) and _triton_eval(x, norms, convs, downsample):
        return _triton_eval_forward(x, norms, convs, downsample)
    h, shortcut = preact_branch(x, None, norms, convs, downsample, tail)
    return h + shortcut


_TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_eval(x: Tensor, norms, convs, downsample) -> bool:
    """True where the eval block can run its first BN + ReLU as the prologue of the Triton
    convolutions that read it: the triton backend, an eval BN with running statistics, plain
    convolutions (no hook: they are not called as modules), a dtype the Triton convolution
    takes (not bfloat16 in the CPU interpreter, whose bfloat16 matrix product is wrong) and no
    autocast (the prologue would have to round the block's input to the autocast dtype before
    normalising it, which the unfused model does not)."""
    bn = norms[0]
    if isinstance(bn, nn.Identity) or _bn_training(bn):
        return False
    if x.dtype not in _TRITON_CONV_DTYPES or (x.dtype == torch.bfloat16 and x.device.type == "cpu"):
        return False
    if _autocast_enabled(x.device.type) or _backend.resolve(x.device) != "triton":
        return False
    return all(_triton_convolution(c) for c in (convs[0], convs[-1])) and (
        downsample is None or _triton_convolution(downsample))


def _triton_convolution(conv: nn.Module) -> bool:
    # (padding="same" / "valid" is a string the fused convolution does not take)
    return _plain_conv(conv) and not isinstance(conv.padding, str)


def _prologue(bn: nn.Module):
    """(scale, shift) of an eval BN as x * scale + shift, in float32 (differentiable: in eval
    mode gradients still reach the BN's weight and bias)."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def _triton_conv(x: Tensor, conv: nn.Conv2d, **kwargs) -> Tensor:
    return FF.fused_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups, **kwargs)


def _triton_eval_forward(x, norms, convs, downsample) -> Tensor:
    """The eval block on the Triton convolution: relu(norms[0](x)) applied by conv1 (and the
    projection) while loading x, so the pre-activation is never written; a folded norms[1]
    (nn.Identity) becomes conv1's ReLU epilogue; the residual add is the last convolution's
    epilogue."""
    scale, shift = _prologue(norms[0])
    prologue = dict(input_scale=scale, input_shift=shift, input_relu=True)
    shortcut = x if downsample is None else _triton_conv(x, downsample, **prologue)
    folded = isinstance(norms[1], nn.Identity)
    h = _triton_conv(x, convs[0], relu=folded, **prologue)
    if not folded:
        h = bn_relu(h, norms[1])
    for conv, norm in zip(convs[1:-1], norms[2:]):
        h = conv_bn_act(h, conv, norm)
    return _triton_conv(h, convs[-1], residual=shortcut)


def _block_plain_reason(block: nn.Module) -> Optional[str]:
    """Why a fused pre-activation block must run its plain forward now (None: fused)."""
    norms = [(name, m) for name, m in block._modules.items() if name.startswith("bn")]
    return plain_reason(norms, [("relu", block._modules["relu"])])


class PreActBasicBlock(_Fused, PlainPreActBasicBlock):
    """PlainPreActBasicBlock (same submodules and arguments), fused."""

    def forward(self, x: Tensor) -> Tensor:
        if _block_plain_reason(self) is not None:
            return super().forward(x)
        check_input(self, x, self.conv1)
        return preact_forward(x, (self.bn1, self.bn2), (self.conv1, self.conv2),
                              self.downsample)

    def branch(self, x: Tensor, a: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(branch, shortcut): the block before its add (preact_branch)."""
        return preact_branch(x, a, (self.bn1, self.bn2), (self.conv1, self.conv2),
                             self.downsample)


class PreActBottleneck(_Fused, PlainPreActBottleneck):
    """PlainPreActBottleneck (same submodules and arguments), fused."""

    def forward(self, x: Tensor) -> Tensor:
        if _block_plain_reason(self) is not None:
            return super().forward(x)
        check_input(self, x, self.conv1)
        return preact_forward(x, (self.bn1, self.bn2, self.bn3),
                              (self.conv1, self.conv2, self.conv3), self.downsample)

    def branch(self, x: Tensor, a: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(branch, shortcut): the block before its add (preact_branch)."""
        return preact_branch(x, a, (self.bn1, self.bn2, self.bn3),
                             (self.conv1, self.conv2, self.conv3), self.downsample)


def model_plain_reason(model: nn.Module) -> Optional[str]:
    """Why a fused PreActResNet must run final_bn + relu unfused now (None: fused)."""
    return plain_reason([("final_bn", model.final_bn)], [("relu", model.relu)])


class PreActResNet(_Fused, PlainPreActResNet):
    """The pre-activation ResNet (see PlainPreActResNet for the arguments), with fused
    blocks (`block` is PreActBasicBlock or PreActBottleneck; their plain classes are taken
    as these) and a fused final BN + ReLU."""

    def __init__(self, block, layers, *args, **kwargs) -> None:
        block = _FUSED_BLOCKS.get(block, block)
        super().__init__(block, layers, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if model_plain_reason(self) is not None:
            return super().forward(x)
        check_input(self, x, self.conv1)
        x = self.stages(self.maxpool(self.conv1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def stages(self, x: Tensor) -> Tensor:
        """relu(final_bn(layer4(...(layer1(x))))). Where chained_blocks allows, the blocks
        run here, each without its add (block.branch), and the add with the BN + ReLU that
        follows it (the next block's bn1, or final_bn) is one op (add_bn_relu), which also
        gives the next block its pre-activation."""
        blocks = self.chained_blocks()
        if blocks is None:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return bn_relu(x, self.final_bn)
        return run_chained(x, [b.branch for b in blocks],
                           [b.bn1 for b in blocks[1:]] + [self.final_bn])

    def chained_blocks(self) -> Optional[list]:
        """The blocks of layer1..layer4, if the model may run them itself: the stages plain
        nn.Sequential of fused blocks (not subclassed), no hook on a stage or a block (it
        would not fire: the blocks are not called), every block fused (_block_plain_reason),
        and some BN in training (otherwise nothing is chained). None otherwise."""
        blocks = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if type(stage) is not nn.Sequential or _hooked(stage):
                return None
            for block in stage:
                if type(block) not in _CHAINABLE or _hooked(block):
                    return None
                blocks.append(block)
        following = [b.bn1 for b in blocks[1:]] + [self.final_bn]  # the BNs after the adds
        if not any(_fusable_norm(bn) and _bn_training(bn) for bn in following):  # (eval)
            return None
        return blocks if all(_block_plain_reason(b) is None for b in blocks) else None


_FUSED_BLOCKS = {PlainPreActBasicBlock: PreActBasicBlock,
                 PlainPreActBottleneck: PreActBottleneck}
_CHAINABLE = (PreActBasicBlock, PreActBottleneck)  # (exact types: a subclass has its forward)

# convert() / unconvert(): plain class <-> fused class (same submodules and attributes)
FUSED = {**_FUSED_BLOCKS, PlainPreActResNet: PreActResNet}


# ---- constructors ----------------------------------------------------------------------------

_CONFIGS = {
    "preact_resnet18": ("PreActResNet18", PreActBasicBlock, [2, 2, 2, 2]),
    "preact_resnet34": ("PreActResNet34", PreActBasicBlock, [3, 4, 6, 3]),
    "preact_resnet50": ("PreActResNet50", PreActBottleneck, [3, 4, 6, 3]),
    "preact_resnet101": ("PreActResNet101", PreActBottleneck, [3, 4, 23, 3]),
    "preact_resnet152": ("PreActResNet152", PreActBottleneck, [3, 8, 36, 3]),
}


def _builder(name: str):
    alias, block, layers = _CONFIGS[name]

    def build(*, weights=None, progress: bool = True, **kwargs) -> PreActResNet:
        if weights is not None:
            raise ValueError(f"fusedres.{name}: the pre-activation ResNets have no pretrained "
                             f"weights (weights must be None, got {weights!r})")
        return PreActResNet(block, layers, **kwargs)

    build.__name__ = build.__qualname__ = alias
    build.__doc__ = (f"The pre-activation ResNet-{name[len('preact_resnet'):]} (He et al., "
                     f"2016), fused; keyword arguments: num_classes, zero_init_residual, "
                     f"groups, width_per_group, norm_layer, widths (see PlainPreActResNet). "
                     f"No pretrained weights.")
    return build


preact_resnet18 = PreActResNet18 = _builder("preact_resnet18")
preact_resnet34 = PreActResNet34 = _builder("preact_resnet34")
preact_resnet50 = PreActResNet50 = _builder("preact_resnet50")
preact_resnet101 = PreActResNet101 = _builder("preact_resnet101")
preact_resnet152 = PreActResNet152 = _builder("preact_resnet152")

BUILDERS = {name: alias for name, (alias, _, _) in _CONFIGS.items()}
