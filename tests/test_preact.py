"""The pre-activation ResNet (v2, fusedres.preact) against a float64 reference written here
with plain nn modules (training steps, eval, both layouts, every backend that runs here),
under autocast and torch.compile, folded, and the ops it launches; timm's ResNetV2 converted
(BatchNorm) or left as it is (BiT: GroupNorm), against timm's own forward."""
import copy
import functools
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from conftest import (TARGETS_AND_REFERENCE, assert_as_accurate, assert_close, each_close64,
                      nudged, randomize_bn, use)
from fusedres.convert import describe
from fusedres.preact import (PlainPreActBasicBlock, PlainPreActBottleneck, PlainPreActResNet,
                             PreActBasicBlock, PreActBottleneck, PreActResNet)

# ---- the float64 reference: plain modules, the paper's block written out ---------------------


class RefBlock(nn.Module):
    """x + F(x): F = conv(relu(bn(...))) units, the first BN + ReLU shared with the projection
    shortcut when the shape changes (attribute names as fusedres's, for the state_dict)."""

    def __init__(self, bottleneck, inplanes, planes, stride, norm, groups=1, base_width=64):
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        mid = int(planes * base_width / 64) * groups if bottleneck else planes
        self.bn1 = norm(inplanes)
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
            self.bn2 = norm(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
            self.bn3 = norm(mid)
            self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn2 = norm(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = (nn.Conv2d(inplanes, out, 1, stride, bias=False)
                           if stride != 1 or inplanes != out else None)
        self.bottleneck = bottleneck

    def forward(self, x):
        a = F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(a)
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        if self.bottleneck:
            h = self.conv3(F.relu(self.bn3(h)))
        return h + shortcut


class RefPreActResNet(nn.Module):
    def __init__(self, bottleneck, layers, widths, num_classes, norm=nn.BatchNorm2d, groups=1,
                 width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(RefBlock(bottleneck, inplanes, planes, stride, norm, groups,
                                       width_per_group))
                inplanes = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.final_bn = norm(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.final_bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {"basic": (PreActBasicBlock, False), "bottleneck": (PreActBottleneck, True)}
TINY = (4, 8, 8, 16)  # the stages' planes: small enough for the Triton interpreter


def randomized(model):
    """model with non-trivial BN affine and statistics, always the same (seeded)."""
    torch.manual_seed(1)
    return randomize_bn(model)


def pair(arch="bottleneck", layers=(2, 1, 1, 1), widths=TINY, norm=nn.BatchNorm2d, **kwargs):
    """(reference, fused PreActResNet) with the same weights (loaded strictly both ways)."""
    block, bottleneck = ARCHS[arch]
    torch.manual_seed(0)
    fused = randomized(PreActResNet(block, list(layers), num_classes=10, widths=widths,
                                    norm_layer=norm, **kwargs))
    reference = RefPreActResNet(bottleneck, layers, widths, 10, norm, **kwargs)
    reference.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(reference.state_dict(), strict=True)
    return reference, fused


def grads(model):
    return [(name, p.grad) for name, p in model.named_parameters()]


# ---- the family against the reference --------------------------------------------------------

# Every target runs both blocks in both layouts, except the Triton interpreter (about a second
# per BN statistics launch): one layout per block, a stage of one block each.
INTERPRETED = [t for t in TARGETS_AND_REFERENCE if t.id == "triton-interpreter"]
CASES = [pytest.param(t.values[0], arch, layout, id=f"{t.id}-{arch}-{layout}", marks=t.marks)
         for t in TARGETS_AND_REFERENCE if t not in INTERPRETED
         for arch in ARCHS for layout in ("nchw", "channels_last")]
CASES += [pytest.param(t.values[0], arch, layout, id=f"{t.id}-{arch}-{layout}", marks=t.marks)
          for t in INTERPRETED
          for arch, layout in (("basic", "nchw"), ("bottleneck", "channels_last"))]


@pytest.mark.parametrize("target, arch, layout", CASES)
def test_float64_training_and_eval_match_the_reference(target, arch, layout):
    """Three SGD steps in float64 (BNs of eps=1e-3 and momentum=0.3: each module's own are
    used): the output and the gradient of every parameter at each step, then every parameter
    and buffer (running statistics, num_batches_tracked), then an eval forward and backward,
    each within 1e-10 of the reference."""
    device = use(target)
    interpreted = target == ("triton", "cpu")
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.3)
    reference, fused = pair(arch, (1, 1, 1, 1) if interpreted else (2, 1, 1, 1), norm=norm)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    models = [m.double().to(device, memory_format=fmt) for m in (reference, fused)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for step in range(4):
        mode = "train" if step < 3 else "eval"
        x = torch.randn(4, 3, 64, 64, dtype=torch.float64, device=device).to(memory_format=fmt)
        target_class = torch.randint(0, 10, (4,), device=device)
        outs = []
        for model, optimizer in zip(models, optimizers):
            getattr(model, mode)()
            optimizer.zero_grad()
            outs.append(model(x))
            F.cross_entropy(outs[-1], target_class).backward()
        assert_close(outs[1], outs[0], torch.float64)
        each_close64(grads(fused), grads(reference))
        if mode == "train":
            for optimizer in optimizers:
                optimizer.step()
            each_close64(fused.state_dict().items(), reference.state_dict().items())
    assert fused.layer1[0].bn1.num_batches_tracked.item() == 3


def test_grouped_and_wide_bottleneck():
    """groups and width_per_group (the ResNeXt / wide variants of the bottleneck) in float64:
    a training step and an eval forward against the reference."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck", widths=(8, 8, 16, 16), groups=2, width_per_group=16)
    assert fused.layer1[0].conv2.groups == 2 and fused.layer1[0].conv2.in_channels == 4
    for model in (reference, fused):
        model.double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    for mode in ("train", "eval"):
        outs = [getattr(m, mode)()(x) for m in (reference, fused)]
        assert_close(outs[1], outs[0], torch.float64)
    each_close64(fused.state_dict().items(), reference.state_dict().items())
    with pytest.raises(ValueError, match="only supports groups=1"):
        fusedres.preact_resnet18(groups=2)


def test_constructors_names_and_state_dict():
    """The constructors, their aliases and get_model build the paper's layout: the
    documented state_dict keys, projections (stride 2 in the 3x3 and in the shortcut) where
    the shape changes, identity shortcuts elsewhere, and the reference loads it strictly."""
    for depth, (block, layers) in {18: (PreActBasicBlock, [2, 2, 2, 2]),
                                   34: (PreActBasicBlock, [3, 4, 6, 3]),
                                   50: (PreActBottleneck, [3, 4, 6, 3]),
                                   101: (PreActBottleneck, [3, 4, 23, 3]),
                                   152: (PreActBottleneck, [3, 8, 36, 3])}.items():
        name = f"preact_resnet{depth}"
        assert getattr(fusedres, f"PreActResNet{depth}") is getattr(fusedres, name)
        assert name in fusedres.list_models()
        model = fusedres.get_model(name.replace("preact", "PreAct"), num_classes=7,
                                   widths=(2, 2, 2, 2))
        assert type(model) is PreActResNet and model.fc.out_features == 7
        assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == layers
        assert all(type(b) is block for i in range(1, 5) for b in getattr(model, f"layer{i}"))
    model = fusedres.preact_resnet50()
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "layer1.0.bn1.weight"]
    assert keys[-7:] == ["final_bn.weight", "final_bn.bias", "final_bn.running_mean",
                         "final_bn.running_var", "final_bn.num_batches_tracked", "fc.weight",
                         "fc.bias"]
    assert "layer2.0.downsample.weight" in keys and "layer2.1.downsample.weight" not in keys
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].downsample.stride == (2, 2)
    assert model.layer1[0].downsample is not None  # 64 -> 256 channels
    assert fusedres.preact_resnet18().layer1[0].downsample is None  # 64 -> 64: identity
    reference = RefPreActResNet(True, [3, 4, 6, 3], (64, 128, 256, 512), 1000)
    reference.load_state_dict(model.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == 25_549_352  # timm's resnetv2_50
    with pytest.raises(ValueError, match="no pretrained weights"):
        fusedres.preact_resnet50(weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="widths must be four positive ints"):
        fusedres.preact_resnet18(widths=(64, 128, 256))
    with pytest.raises(ValueError, match="not a ResNet fusedres builds"):
        fusedres.get_model("preact_resnet19")


def test_zero_init_residual():
    """zero_init_residual zeroes each block's last convolution: every identity-shortcut block
    starts as the identity, in training too."""
    use(("cpp", "cpu"))
    model = fusedres.preact_resnet50(zero_init_residual=True, widths=TINY)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    assert all(not b.conv3.weight.any() for b in blocks)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(model.layer1[1](x), x)
    assert fusedres.preact_resnet18(zero_init_residual=True).layer4[1].conv2.weight.abs().sum() == 0


# ---- what runs fused ---------------------------------------------------------------------------


def launches(model, x, backward=False):
    """{op name: count} of the fusedres and ATen batch-norm ops one forward (+ backward) runs."""
    with torch.profiler.profile() as prof:
        out = model(x)
        if backward:
            out.sum().backward()
    counts = {}
    for e in prof.events():
        if e.name.startswith("fusedres") and "::" in e.name or (
                e.name.startswith("aten::") and "batch_norm" in e.name):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_every_bn_relu_is_one_fused_op(arch):
    """Training: one fused BN + ReLU training op per BN (its backward one fused reduce and one
    input-gradient op), no ATen batch norm; each block's add is one op with the BN + ReLU
    after it (the next block's bn1, or final_bn). Eval: per BN one op computes its coefficients
    and one fused affine + ReLU pass applies them; after fold_bn, the BNs after a convolution
    are its bias + ReLU epilogue (conv_bias_relu) and only the pre-activations (each block's
    bn1, final_bn) remain as fused passes."""
    use(("cpp", "cpu"))
    _, model = pair(arch)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 64, 64)
    counts = launches(model.train(), x, backward=True)
    assert counts.get("fusedres::add_batch_norm_act_train") == len(blocks)
    assert counts.get("fusedres::batch_norm_act_train") == bns - len(blocks)
    assert counts.get("fusedres::batch_norm_backward_reduce") == bns
    assert counts.get("fusedres::batch_norm_backward_input") == bns
    assert not [k for k in counts if k.startswith("aten::")], counts
    counts = launches(model.eval(), x)
    assert counts == {"fusedres::batch_norm_coefficients": bns, "fusedres::batch_norm_apply": bns}
    folded = fusedres.fold_bn(model)
    counts = launches(folded, x)
    assert counts == {"fusedres::batch_norm_coefficients": len(blocks) + 1,
                      "fusedres::batch_norm_apply": len(blocks) + 1,
                      "fusedres::conv_bias_relu": bns - len(blocks) - 1}


def test_fold_bn():
    """fold_bn folds bn2 / bn3 into the convolution before them (float64: within 1e-9 of the
    reference), keeps each block's bn1 and final_bn without a warning, and leaves the model
    it was given unchanged; the unfused classes fold the same."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck")
    for model in (reference, fused):
        model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fusedres.fold_bn(fused)
        plain = fusedres.fold_bn(fusedres.unconvert(copy.deepcopy(fused)))
    assert type(plain) is PlainPreActResNet
    for model in (folded, plain):
        block = model.layer2[0]
        assert isinstance(block.bn2, nn.Identity) and isinstance(block.bn3, nn.Identity)
        assert isinstance(block.bn1, nn.BatchNorm2d) and isinstance(model.final_bn, nn.BatchNorm2d)
        assert block.conv1.bias is not None
    assert isinstance(fused.layer2[0].bn2, nn.BatchNorm2d)
    with torch.no_grad():
        expected = reference(x)
        for model in (folded, plain):
            assert_close(model(x), expected, torch.float64, {torch.float64: 1e-9})


def test_hooks_tracing_and_torchscript_run_the_plain_forward():
    """A hook on a BN makes that block run the plain forward (the hook sees the BN's output),
    the others stay fused; FX traces and TorchScript scripts the plain modules (no fusedres
    op), with the same numbers."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck")
    x = torch.randn(2, 3, 64, 64)
    for model in (reference, fused):
        model.eval()
    seen = []
    handle = fused.layer1[1].bn2.register_forward_hook(lambda m, args, out: seen.append(out))
    assert describe(fused.layer1[1]) == \
        "its own forward, unfused (bn2 has a hook)"
    assert describe(fused.layer1[0]) == "fused"
    with torch.no_grad():
        assert_close(fused(x), reference(x), torch.float32)
    assert len(seen) == 1 and seen[0].shape == (2, 4, 16, 16)
    handle.remove()
    traced = torch.fx.symbolic_trace(fused)
    assert not [n for n in traced.graph.nodes if "fusedres" in str(n.target)]
    scripted = torch.jit.script(fused)
    assert "fusedres::" not in str(scripted.inlined_graph)
    with torch.no_grad():
        for model in (traced, scripted):
            assert_close(model(x), reference(x), torch.float32)
    assert type(fused) is PreActResNet  # scripting compiled a plain copy


@pytest.mark.parametrize("case", ["block-hook", "stage-hook", "frozen-bn", "subclass",
                                  "group-norm"])
def test_chained_adds_fall_back_where_the_blocks_must_be_called(case):
    """The model runs its blocks itself (each add with the next BN + ReLU) only where nothing
    can tell: a hook on a block or a stage fires (the blocks are called as modules), a BN in
    eval mode gets the add and its affine pass from the same op (and the chain goes on past
    it), a subclassed block runs its own forward, a block with another norm layer its plain
    one (in eval too). Training output, gradients and running statistics match the reference
    (float64) in every case."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck")
    for model in (reference, fused):
        model.double().train()
    seen = []
    if case == "block-hook":
        fused.layer2[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    elif case == "stage-hook":
        fused.layer3.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    elif case == "frozen-bn":
        for model in (reference, fused):
            model.layer3[0].bn1.eval()
    elif case == "group-norm":
        for model in (reference, fused):
            model.layer2[0].bn1 = nn.GroupNorm(2, model.layer2[0].bn1.num_features).double()
    else:
        class Block(PreActBottleneck):
            def forward(self, x):
                seen.append(x.shape)
                return super().forward(x)
        fused.layer4[0].__class__ = Block
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = [model(x) for model in (reference, fused)]
    for out in outs:
        out.square().sum().backward()
    assert_close(outs[1], outs[0], torch.float64)
    each_close64(grads(fused), grads(reference))
    each_close64(fused.state_dict().items(), reference.state_dict().items())
    chained = fused.chained_blocks() is not None
    assert chained == (case == "frozen-bn")
    assert len(seen) == (0 if chained or case == "group-norm" else 1)
    counts = launches(copy.deepcopy(fused), x)  # (a copy: the statistics stay the reference's)
    assert counts.get("fusedres::add_batch_norm_act_train", 0) == (4 if chained else 0)
    with torch.no_grad():
        assert_close(fused.eval()(x), reference.eval()(x), torch.float64)


def test_convert_and_unconvert(capsys):
    """unconvert gives the plain classes (same object, same state), convert fuses them again;
    convert(verbose=True) reports every block fused."""
    use(("cpp", "cpu"))
    _, fused = pair("basic")
    x = torch.randn(2, 3, 64, 64)
    expected = fused.eval()(x)
    plain = fusedres.unconvert(fused)
    assert plain is fused and type(plain) is PlainPreActResNet
    assert type(plain.layer2[0]) is PlainPreActBasicBlock
    assert_close(plain(x), expected, torch.float32)
    fusedres.convert(plain, verbose=True)
    report = capsys.readouterr().out
    assert "6 module(s) converted; of 5 block(s) (eval mode): 5 fused" in report
    assert "final_bn + relu fused" in report
    assert type(plain.layer1[1]) is PreActBasicBlock
    unfused_bottleneck = fusedres.unconvert(pair("bottleneck")[1]).layer1[0]
    assert type(unfused_bottleneck) is PlainPreActBottleneck


def test_bad_input():
    use(("cpp", "cpu"))
    _, fused = pair("basic")
    with pytest.raises(ValueError, match="PreActResNet input must have 3 channels"):
        fused(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="PreActBasicBlock input must have 4 channels"):
        fused.layer1[0](torch.randn(2, 8, 8, 8))
    with pytest.raises(TypeError, match="dtype of its parameters"):
        fused.eval()(torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_norm_layer_runs_unfused(mode):
    """norm_layer=GroupNorm: the blocks and the model run their plain forward (and say why)."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck", norm=lambda c: nn.GroupNorm(2, c))
    for model in (reference, fused):
        getattr(model, mode)()
    assert describe(fused.layer1[0]) == ("its own forward, unfused (bn1 is GroupNorm, not a "
                                         "BatchNorm2d the fused ops implement)")
    x = torch.randn(2, 3, 64, 64)
    assert_close(fused(x), reference(x), torch.float32)


# ---- autocast, torch.compile --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_bfloat16(mode):
    """Under CPU autocast the fused model computes in bfloat16 like the reference does, and is
    as accurate against float64."""
    use(("cpp", "cpu"))
    reference, fused = pair("bottleneck", layers=(2, 2, 2, 2), widths=(8, 16, 32, 64))
    reference64 = copy.deepcopy(reference).double()
    for model in (reference, fused, reference64):
        getattr(model, mode)()
    x = torch.randn(4, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), reference(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_as_accurate(out, ref, reference64(x.double()))


def test_compile_fullgraph_train_and_eval():
    """torch.compile(fullgraph=True) traces the fused ops (no graph break), train and eval."""
    use(("cpp", "cpu"))
    torch._dynamo.reset()
    _, fused = pair("bottleneck", layers=(1, 1, 1, 1))
    compiled_model = copy.deepcopy(fused)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        getattr(fused, mode)()
        getattr(compiled_model, mode)()
        out, expected = compiled(x), fused(x)
        assert_close(out, expected, torch.float32)
        out.sum().backward()
        expected.sum().backward()
        for p, q in zip(compiled_model.parameters(), fused.parameters()):
            assert_close(p.grad, q.grad, torch.float32, {torch.float32: 1e-4})
    each_close64(compiled_model.state_dict().items(), fused.state_dict().items(), 1e-6)


# ---- the Triton prologue ------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("folded", [False, True], ids=["bn", "folded"])
def test_triton_eval_applies_the_preactivation_in_the_conv_prologue(folded):
    """Eval on the triton backend (float32): each block's bn1 + relu is the prologue of conv1
    and of the projection (the pre-activation is never written: no BN pass for it) and the
    residual add the epilogue of the last convolution; after fold_bn conv1's ReLU epilogue
    applies bn2 too. The output and the gradients (BN in eval: fine-tuning) are as accurate
    as the float32 reference's against float64."""
    device = use(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    reference, fused = pair("bottleneck", layers=(2, 1, 1, 1))
    models = [m.to(device).eval() for m in (reference, fused, copy.deepcopy(reference).double())]
    if folded:
        models[1] = fused = fusedres.fold_bn(fused)
    blocks = [b for i in range(1, 5) for b in getattr(fused, f"layer{i}")]
    x = torch.randn(2, 3, 64, 64, device=device)
    counts = launches(fused, x)
    # conv1 and conv3 of each block, the four projections, and the folded conv2 (bias + ReLU)
    convs = 2 * len(blocks) + 4 + (len(blocks) if folded else 0)
    assert counts.get("fusedres_triton::fused_conv2d") == convs
    bn_passes = 1 + (0 if folded else 2 * len(blocks))  # final_bn, and bn2, bn3 unless folded
    assert counts.get("fusedres_triton::batch_norm_apply") == bn_passes
    outs = []
    for model in models:
        model.zero_grad()
        outs.append(model(x.double() if model is models[2] else x))
        outs[-1].sum().backward()
    assert_as_accurate(outs[1], outs[0], outs[2])
    if not folded:  # (the folded model's convolutions have other weights)
        for name, ours, ref32, ref64 in zip([n for n, _ in fused.named_parameters()],
                                            *(m.parameters() for m in models)):
            assert_as_accurate(ours.grad, ref32.grad, ref64.grad), name


# ---- timm's ResNetV2 ----------------------------------------------------------------------------


def timm_key(key):
    """A timm ResNetV2 state_dict key as fusedres's PreActResNet names it."""
    if key.startswith("stages."):  # stages.S.blocks.B.(normK|convK|downsample.conv).*
        _, stage, _, block, rest = key.split(".", 4)
        rest = rest.replace("downsample.conv", "downsample").replace("norm", "bn")
        return f"layer{int(stage) + 1}.{block}.{rest}"
    for old, new in (("stem.conv.", "conv1."), ("norm.", "final_bn."), ("head.fc.", "fc.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_is_timms_resnetv2(arch):
    """fusedres's layout is timm's ResNetV2 (resnetv2_18 / resnetv2_50, He et al.'s
    pre-activation blocks): with timm's weights renamed, the same outputs and gradients in
    float64, training and eval."""
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    name, widths = {"basic": ("resnetv2_18", (8, 16, 16, 32)),
                    "bottleneck": ("resnetv2_50", (32, 64, 64, 128))}[arch]
    torch.manual_seed(0)
    theirs = randomized(timm.create_model(name, num_classes=10, stem_chs=8,
                                          channels=widths).double())
    ours = PreActResNet(ARCHS[arch][0], [2, 2, 2, 2] if arch == "basic" else [3, 4, 6, 3],
                        num_classes=10, widths=(8, 16, 16, 32)).double()
    state = {timm_key(k): v.reshape(10, -1) if k == "head.fc.weight" else v
             for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for mode in ("train", "eval"):
        outs = []
        for model in (theirs, ours):
            getattr(model, mode)()
            model.zero_grad()
            outs.append(model(x))
            outs[-1].square().sum().backward()
        assert_close(outs[1], outs[0], torch.float64)
        each_close64(sorted((timm_key(k), p.grad.reshape(10, -1) if k == "head.fc.weight"
                             else p.grad) for k, p in theirs.named_parameters()),
                     sorted(grads(ours)))


@pytest.mark.parametrize("arch", ["resnetv2_50", "resnetv2_50d"])
def test_convert_timm_resnetv2(arch, capsys):
    """timm's ResNetV2 with BatchNorm converts (its blocks, and the model for the stem's and
    the final BN + ReLU): float64 eval output, then two SGD steps (outputs, gradients, every
    parameter and buffer), each within 1e-10 of timm's own unconverted copy, or within 10x the
    noise of a nudged twin of it where that is more (the second step's gradients: a one-ulp
    nudge of the parameters moves them by 7e-11 in resnetv2_50d). A hook on one block's norm
    makes that block run timm's forward."""
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    reference = randomized(timm.create_model(arch, pretrained=False, num_classes=10)).double()
    converted = fusedres.convert(copy.deepcopy(reference), verbose=True)
    report = capsys.readouterr().out
    assert "17 module(s) converted; of 16 block(s) (training mode): 16 fused" in report
    stem_bns = 2 if arch == "resnetv2_50d" else 0
    assert f"{stem_bns + 1} of the stem's and final BN + ReLU fused" in report
    assert type(converted).__name__ == "FusedResNetV2"
    assert type(converted.stages[0].blocks[0]).__name__ == "FusedPreActBottleneck"
    assert list(converted.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    twin = nudged(reference)
    models = (reference, converted, twin)
    with torch.no_grad():
        assert_close(converted.eval()(x), reference.eval()(x), torch.float64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for _ in range(2):
        target = torch.randint(0, 10, (4,))
        outs = []
        for model, optimizer in zip(models, optimizers):
            model.train()
            optimizer.zero_grad()
            outs.append(model(x))
            F.cross_entropy(outs[-1], target).backward()
            optimizer.step()
        each_close64([("output", outs[1])], [("output", outs[0])], noise=[("output", outs[2])])
        each_close64(grads(converted), grads(reference), noise=grads(twin))
    each_close64(converted.state_dict().items(), reference.state_dict().items(),
                 noise=twin.state_dict().items())
    block = converted.stages[1].blocks[1]
    block.norm2.register_forward_hook(lambda *args: None)
    assert describe(block) == "timm's own forward (norm2 has a hook)"
    with torch.no_grad():
        assert_close(converted.eval()(x), reference.eval()(x), torch.float64)
    fusedres.unconvert(converted)
    assert type(converted) is type(reference)
    assert type(converted.stages[0].blocks[0]) is type(reference.stages[0].blocks[0])


def tiny_timm(name="resnetv2_18", **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomized(timm.create_model(name, num_classes=10, stem_chs=8,
                                        channels=(8, 16, 16, 32), **kwargs))


def test_timm_resnetv2_drop_path_and_other_activations():
    """DropPath (active in training) runs between the last convolution and the add, drawing
    the same random numbers as timm's forward; a block whose norm applies another activation
    runs timm's forward and says so."""
    use(("cpp", "cpu"))
    reference = tiny_timm(drop_path_rate=0.3).double()
    converted = fusedres.convert(copy.deepcopy(reference))
    assert describe(converted.stages[1].blocks[0]) == "fused"
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    outs = []
    for model in (reference, converted):
        torch.manual_seed(5)
        outs.append(model.train()(x))
    assert_close(outs[1], outs[0], torch.float64)
    reference = tiny_timm(act_layer=nn.SiLU)
    converted = fusedres.convert(copy.deepcopy(reference))
    assert describe(converted.stages[0].blocks[0]) == \
        "timm's own forward (norm1.act is SiLU, not nn.ReLU)"
    assert "unfused: norm.act is SiLU, not nn.ReLU" in describe(converted)
    x = torch.randn(2, 3, 64, 64)
    assert_close(converted(x), reference(x), torch.float32)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_timm_resnetv2_chains_each_add_with_the_next_bn(checkpointing):
    """In training the converted model runs its blocks itself, each add one op with the BN +
    ReLU after it (the next block's norm1, or the final norm), DropPath included; a stage with
    gradient checkpointing runs timm's stages (checkpointed) instead. Output, gradients and
    running statistics as timm's (float64)."""
    use(("cpp", "cpu"))
    reference = tiny_timm(drop_path_rate=0.2).double()
    converted = fusedres.convert(copy.deepcopy(reference))
    for model in (reference, converted):
        model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = []
    for model in (reference, converted):
        torch.manual_seed(5)
        outs.append(model.train()(x))
        outs[-1].square().sum().backward()
    assert_close(outs[1], outs[0], torch.float64)
    each_close64(grads(converted), grads(reference))
    each_close64(converted.state_dict().items(), reference.state_dict().items())
    blocks = sum(len(stage.blocks) for stage in converted.stages)
    counts = launches(converted, x)
    assert counts.get("fusedres::add_batch_norm_act_train", 0) == (0 if checkpointing else blocks)


def test_timm_bit_resnetv2_is_left_as_it_is(capsys):
    """The BiT ResNetV2 (GroupNorm, weight-standardised convolutions) is not converted;
    convert(verbose=True) names every module it leaves and why; the model computes exactly
    what timm's does."""
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    reference = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    model = fusedres.convert(copy.deepcopy(reference), verbose=True)
    report = capsys.readouterr().out
    assert "0 module(s) converted" in report
    assert "left as they are: 17 timm ResNetV2 module(s)" in report
    assert ("stages.0.blocks.0: PreActBottleneck, timm's own forward, not converted (norm1 is "
            "GroupNormAct, not BatchNorm; a BiT model: GroupNorm and weight-standardised "
            "convolutions)") in report
    assert all(type(a) is type(b) for a, b in zip(model.modules(), reference.modules()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_converted_timm_resnetv2_pickles():
    """torch.save of a whole converted model: the fused timm classes are found by name."""
    use(("cpp", "cpu"))
    model = fusedres.convert(tiny_timm().eval())
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.stages[0].blocks[0]).__name__ == "FusedPreActBasic"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
