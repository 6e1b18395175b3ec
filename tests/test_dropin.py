"""fusedres dropped into code nobody here wrote: weights edited through `.data` (EMA teachers,
surgery, BN recalibration), pickling and deepcopy, pruning, parametrizations, hooks, QAT
observers, ONNX export, TorchScript, FX feature extraction, convert() in place and
unconvert(), timm blocks with SE / DropPath, fold_bn's coverage, torchvision's builders and
weights. Each is checked against the unfused torchvision / timm model doing the same."""
import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import torchvision  # a dependency of fusedres

import fusedres  # noqa: E402
from conftest import assert_as_accurate, assert_close, use  # noqa: E402
from test_models import pair  # noqa: E402

DEEP = {torch.float32: 2e-4}


def twins(arch="resnet18", **kwargs):
    """(torchvision model, converted copy, float64 torchvision copy) with the same weights and
    non-trivial BN statistics."""
    reference, _ = pair(arch, num_classes=10, **kwargs)
    return reference, fusedres.convert(copy.deepcopy(reference)), copy.deepcopy(reference).double()


def check_eval(models, x, **bounds):
    """The fused model (models[1]) in eval as accurate as torchvision's float32 (models[0])
    against float64 (models[2]), under no_grad."""
    reference, fused, reference64 = models
    with torch.no_grad():
        outs = [m.eval()(x.double() if m is reference64 else x) for m in models]
    assert_as_accurate(outs[1], outs[0], outs[2], **bounds)


# ---- no stale or hidden state ----------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_eval_sees_every_write_through_data(grad_mode):
    """Writes through .data do not bump a tensor's version counter: an EMA / mean teacher, weight
    surgery, clipping and BN recalibration through .data all show in the next eval output."""
    use(("cpp", "cpu"))
    models = twins()
    x = torch.randn(2, 3, 32, 32)
    context = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    student = copy.deepcopy(models[0])

    def edit(model):
        for p in model.parameters():
            p.data.mul_(0.9)
        for teacher_p, p in zip(model.parameters(), student.parameters()):  # EMA teacher
            teacher_p.data.mul_(0.99).add_(p.data.to(teacher_p.dtype), alpha=0.01)
        model.layer2[0].conv1.weight.data.clamp_(-0.05, 0.05)
        model.layer3[1].conv2.weight.data.copy_(model.layer3[1].conv2.weight.data.flip(0))
        model.layer1[0].bn1.running_var.data.mul_(2.0)
        model.layer4[0].downsample[1].running_mean.data.add_(0.3)

    for step in range(3):
        with context():
            outs = [m.eval()(x.double() if i == 2 else x) for i, m in enumerate(models)]
        assert_as_accurate(outs[1], outs[0], outs[2])
        for model in models:
            edit(model)


def module_state(model):
    return [(name, sorted(m.__dict__)) for name, m in model.named_modules()]


def test_eval_leaves_no_state_to_pickle_or_copy():
    """Nothing is cached on the modules: torch.save of a model is as large after an eval
    forward as before, and a deepcopy (an EMA model) carries nothing extra."""
    use(("cpp", "cpu"))
    _, fused, _ = twins()
    before, fresh = io.BytesIO(), module_state(fused)
    torch.save(fused, before)
    with torch.no_grad():
        fused.eval()(torch.randn(2, 3, 32, 32))
    after = io.BytesIO()
    torch.save(fused, after)
    assert abs(after.tell() - before.tell()) < 4096, (before.tell(), after.tell())
    assert module_state(copy.deepcopy(fused)) == module_state(fused) == fresh


# ---- tools that work through the modules ---------------------------------------------------------


def train_steps(models, steps=2, channels_last=False):
    """SGD steps on each model with the same batches; each step's gradients of the fused model
    (models[1]) as accurate as torchvision's float32 against float64, parameter by parameter.
    Each step starts from torchvision's state (loaded into the others): some gradients are
    ill-conditioned (a BN after a conv makes the loss blind to the conv's scale, so a
    weight_norm magnitude's gradient is nearly 0 and 17% off in float32), and two float32
    trajectories that differ by rounding then drift apart faster than either from float64."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    for _ in range(steps):
        x = torch.randn(4, 3, 48, 48)
        target = torch.randint(0, 10, (4,))
        for model in models[1:]:
            model.load_state_dict(models[0].state_dict())
        for model, optimizer in zip(models, optimizers):
            model.train()
            optimizer.zero_grad()
            inputs = x.double() if model is models[2] else x
            F.cross_entropy(model(inputs), target).backward()
        for (name, p32), p, p64 in zip(models[0].named_parameters(), models[1].parameters(),
                                       models[2].parameters()):
            try:
                assert_as_accurate(p.grad, p32.grad, p64.grad, floor=1e-3, factor=10)
            except AssertionError as e:
                raise AssertionError(f"gradient of {name}: {e}") from None
        for optimizer in optimizers:
            optimizer.step()


def test_pruning_trains_and_evaluates():
    """torch.nn.utils.prune recomputes conv.weight in a forward pre-hook: the converted blocks
    call their convolutions as modules, so training steps and eval see the pruned weights."""
    use(("cpp", "cpu"))
    models = twins()
    for model in models:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d) and name != "conv1":
                torch.manual_seed(1)
                prune.l1_unstructured(m, "weight", amount=0.3)
    train_steps(models, steps=3)
    check_eval(models, torch.randn(4, 3, 48, 48), floor=1e-3)
    pruned = models[1].layer2[1].conv2
    assert (pruned.weight == 0).float().mean() >= 0.29  # the mask applies to what runs


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm", "spectral_norm",
                                  "legacy_weight_norm"])
def test_parametrizations(kind):
    """Parametrized conv weights (torch.nn.utils.parametrize and the parametrizations built on
    it, and the older hook-based torch.nn.utils.weight_norm) are computed by the module; train
    and eval match torchvision with the same ones."""
    use(("cpp", "cpu"))
    parametrizations = torch.nn.utils.parametrizations

    class Scaled(torch.nn.Module):
        def forward(self, w):
            return w * 1.5

    def convs(model):
        return [m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d) and name.startswith(("layer1", "layer3"))]

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    if kind == "legacy_weight_norm":  # a hook; such a module cannot be deep-copied
        models = [reference, fusedres.convert(copy.deepcopy(reference)),
                  copy.deepcopy(reference).double()]
        for model in models:
            for m in convs(model):
                torch.nn.utils.weight_norm(m)
    else:
        for m in convs(reference):
            if kind == "parametrize":
                torch.nn.utils.parametrize.register_parametrization(m, "weight", Scaled())
            elif kind == "weight_norm":
                parametrizations.weight_norm(m)
            else:
                parametrizations.spectral_norm(m)
        models = [reference, fusedres.convert(copy.deepcopy(reference)),
                  copy.deepcopy(reference).double()]
    train_steps(models)
    check_eval(models, torch.randn(4, 3, 48, 48), floor=1e-3)


def test_hooks_fire_as_in_torchvision():
    """Forward hooks on the convolutions, BNs and ReLUs inside converted blocks, on the stem and
    on a downsample fire as often as in torchvision, with the same tensors."""
    use(("cpp", "cpu"))
    reference, fused, _ = twins()
    names = ["conv1", "bn1", "relu", "layer1.0.conv1", "layer1.0.bn2", "layer1.1.relu",
             "layer2.0.downsample", "layer3.0.downsample.1", "layer4.1.conv2"]
    seen = {}
    for tag, model in (("reference", reference), ("fused", fused)):
        modules = dict(model.named_modules())
        for name in names:
            modules[name].register_forward_hook(
                lambda m, args, out, key=(tag, name): seen.setdefault(key, []).append(out.clone()))
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        seen.clear()
        for model in (reference, fused):
            getattr(model, mode)()
            model(x)
        for name in names:
            ours, theirs = seen[("fused", name)], seen[("reference", name)]
            assert len(ours) == len(theirs), name
            for a, b in zip(ours, theirs):
                assert_close(a, b, torch.float32, DEEP)


def test_blocks_without_hooks_stay_fused():
    """A hook on one block's BN makes that block run torchvision's forward; the others (and
    the same block once the hook is removed) still run the fused ops."""
    use(("cpp", "cpu"))
    _, fused, _ = twins()
    block = fused.layer2[1]
    assert not fusedres.nn.runs_plain(block)
    handle = block.bn1.register_forward_hook(lambda *args: None)
    assert fusedres.nn.runs_plain(block) and not fusedres.nn.runs_plain(fused.layer2[0])
    handle.remove()
    assert not fusedres.nn.runs_plain(block)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert fusedres.nn.runs_plain(block)  # a global hook watches every module
    finally:
        handle.remove()
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            fused.eval()(torch.randn(2, 3, 32, 32))
    fused_calls = [e for e in prof.events() if e.name.startswith("fusedres::")]
    assert len(fused_calls) >= 8


def test_qat_observers():
    """Eager-mode QAT (prepare_qat swaps the convolutions and hooks observers onto the modules):
    the converted model computes what torchvision's does under the same preparation."""
    use(("cpp", "cpu"))
    quant = torch.ao.quantization
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).train()
    reference.qconfig = quant.get_default_qat_qconfig("x86")
    fused = fusedres.convert(copy.deepcopy(reference))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.prepare_qat(reference, inplace=True)
        quant.prepare_qat(fused, inplace=True)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        assert_close(fused(x), reference(x), torch.float32, DEEP)


# ---- deployment and analysis ---------------------------------------------------------------------


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export(folded, dynamo):
    """ONNX export of an eval model gives the ordinary graph (Conv, Relu, Add; no fusedres
    domain), which onnxruntime (or, without it, the ONNX checker) accepts."""
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    use(("cpp", "cpu"))
    reference, fused, _ = twins()
    model = fusedres.fold_bn(fused.eval()) if folded else fused.eval()
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=dynamo, input_names=["x"])
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert {"Conv", "Relu", "Add"} <= ops
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        assert_close(out, reference.eval()(x), torch.float32, DEEP)


def test_torchscript_script_and_trace():
    """torch.jit.script compiles the unfused torchvision classes (sharing the parameters) and
    leaves the model itself fused; torch.jit.trace records the ordinary graph. Both save and
    load without fusedres ops."""
    use(("cpp", "cpu"))
    reference, fused, _ = twins()
    fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.eval()(x)
        for compiled in (torch.jit.script(fused), torch.jit.trace(fused, x)):
            buffer = io.BytesIO()
            torch.jit.save(compiled, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            assert "fusedres::" not in str(loaded.inlined_graph)
            assert_close(loaded(x), expected, torch.float32, DEEP)
    assert type(fused) is fusedres.ResNet and type(fused.layer1[0]) is fusedres.nn.BasicBlock
    scripted = torch.jit.script(fused)
    with torch.no_grad():
        fused.fc.weight.mul_(2)  # shared parameters
        assert_close(scripted(x), fused(x), torch.float32, DEEP)


def test_fx_feature_extraction():
    """torchvision's create_feature_extractor (FX symbolic tracing) sees torchvision's graph,
    node names included, and the features match."""
    use(("cpp", "cpu"))
    from torchvision.models.feature_extraction import create_feature_extractor

    reference, fused, _ = twins()
    nodes = {"layer1": "f1", "layer3.0.bn2": "f3", "layer4.1.relu_1": "f4"}
    extract = [create_feature_extractor(m.eval(), nodes) for m in (reference, fused)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs, ours = (e(x) for e in extract)
    for key in theirs:
        assert_close(ours[key], theirs[key], torch.float32, DEEP)
    assert torch.fx.symbolic_trace(fused).graph is not None


# ---- convert / unconvert / fold_bn ---------------------------------------------------------------


def test_convert_is_in_place():
    """An optimizer built before convert() trains the converted model (the same object and
    parameters); asking for a copy is an error that says how to get one."""
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    converted = fusedres.convert(model)
    assert converted is model and isinstance(model, torchvision.models.ResNet)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    optimizer.step()
    assert not torch.equal(model.fc.weight, before)
    with pytest.raises(ValueError, match=r"works in place.*copy.deepcopy"):
        fusedres.convert(model, inplace=False)


def test_unconvert():
    """unconvert() gives torchvision's own classes back, in place, with the same state and
    outputs (also for a fusedres-built model with the stride in the 1x1)."""
    use(("cpp", "cpu"))
    reference, fused, _ = twins("resnet50")
    plain = fusedres.unconvert(fused)
    assert plain is fused and type(plain) is torchvision.models.ResNet
    assert {type(m) for m in plain.modules()}.isdisjoint(
        {fusedres.ResNet, fusedres.nn.BasicBlock, fusedres.nn.Bottleneck})
    assert list(plain.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        assert_close(getattr(plain, mode)()(x), getattr(reference, mode)()(x), torch.float32, DEEP)
    v1 = fusedres.resnet50(num_classes=10, stride_in_1x1=True).eval()
    with torch.no_grad():
        out = v1(x)
        assert_close(fusedres.unconvert(v1)(x), out, torch.float32, DEEP)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_timm_se_and_drop_path_blocks_are_fused(mode, capsys, monkeypatch):
    """timm blocks with squeeze-excitation or DropPath run fused (the SE / drop path between
    the last BN and the residual add), match timm, and the report says so."""
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    for arch, kwargs in (("seresnet18", {}), ("resnet18", {"drop_path_rate": 0.2})):
        torch.manual_seed(0)
        reference = timm.create_model(arch, num_classes=10, **kwargs)
        reference64 = copy.deepcopy(reference).double()
        fused = fusedres.convert(copy.deepcopy(reference).train(mode == "train"), verbose=True)
        report = capsys.readouterr().out
        for block in (m for m in fused.modules() if type(m).__name__.startswith("Fused")):
            monkeypatch.setattr(type(block), "_fusedres_original_forward", None)  # not called
        if arch == "seresnet18":
            assert "8 partly fused" in report, report
        elif mode == "train":  # the first block's drop_prob is 0
            assert "1 fused, 7 partly fused" in report, report
        else:
            assert "8 fused" in report, report
        x = torch.randn(2, 3, 32, 32)
        outs = []
        for model in (reference, fused, reference64):
            getattr(model, mode)()
            torch.manual_seed(1)  # the same drop-path masks
            outs.append(model(x.double() if model is reference64 else x))
        assert_as_accurate(*outs)


def test_converted_timm_model_pickles(tmp_path):
    """torch.save of a whole converted timm model (checkpoints, EMA copies) loads back, also
    in a fresh process, and computes the same."""
    timm = pytest.importorskip("timm")
    import subprocess
    import sys

    use(("cpp", "cpu"))
    torch.manual_seed(0)
    model = fusedres.convert(timm.create_model("resnet18", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    path, x_path = tmp_path / "model.pt", tmp_path / "x.pt"
    torch.save(model, path)
    torch.save(x, x_path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        expected = model(x)
        assert_close(loaded(x), expected, torch.float32, DEEP)
    code = (f"import torch; m = torch.load({str(path)!r}, weights_only=False); "
            f"x = torch.load({str(x_path)!r}); print(type(m.layer1[0]).__name__); "
            f"torch.save(m(x).detach(), {str(tmp_path / 'out.pt')!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "FusedBasicBlock"
    assert_close(torch.load(tmp_path / "out.pt"), expected, torch.float32, DEEP)


def test_fold_bn_covers_timm_and_names_what_it_leaves():
    """fold_bn folds the BNs of timm's blocks (SE ones too) and stem, and warns, naming them,
    about BNs it cannot fold (here: behind a pruned convolution, and after a non-conv)."""
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    reference = timm.create_model("seresnet18", num_classes=10).eval()
    fused = fusedres.convert(copy.deepcopy(reference))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fusedres.fold_bn(fused)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(folded(x), reference(x), torch.float32, DEEP)
    prune.l1_unstructured(fused.layer1[0].conv1, "weight", amount=0.3)
    fused.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(3)).eval()
    with pytest.raises(RuntimeError, match=r"cannot be deep-copied.*inplace=True"):
        fusedres.fold_bn(fused)
    with pytest.warns(UserWarning, match=r"2 normalization layer\(s\) left unfolded.*"
                                         r"layer1\.0\.bn1.*head\.1"):
        fusedres.fold_bn(fused, inplace=True)
    assert isinstance(fused.layer1[0].bn1, torch.nn.BatchNorm2d)  # behind the pruned conv


# ---- torchvision's API -------------------------------------------------------------------------


def test_builders_and_weights(tmp_path, monkeypatch):
    """fusedres.resnet18(weights=...) loads torchvision's weights through torchvision (offline:
    from the hub cache), get_model builds any ResNet-family name, and the results are
    torchvision ResNets."""
    use(("cpp", "cpu"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), cache / os.path.basename(weights.url))
    reference = torchvision.models.resnet18(weights=weights, progress=False).eval()
    fused = fusedres.resnet18(weights="IMAGENET1K_V1", progress=False).eval()
    assert isinstance(fused, torchvision.models.ResNet) and isinstance(fused, fusedres.ResNet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(fused(x), reference(x), torch.float32, DEEP)
    model = fusedres.get_model("resnext50_32x4d", num_classes=7)
    assert type(model) is fusedres.ResNet and model.fc.out_features == 7
    assert isinstance(model.layer1[0], fusedres.nn.Bottleneck)
    names = fusedres.list_models()  # torchvision's ResNets, then the pre-activation ones
    assert names == ([n for n in names if n in torchvision.models.list_models()]
                     + list(fusedres.preact.BUILDERS))
    assert type(fusedres.get_model("preact_resnet18", num_classes=3)) is fusedres.PreActResNet
    with pytest.raises(ValueError, match="'vgg16' is not a ResNet"):
        fusedres.get_model("vgg16")
    with pytest.raises(ValueError, match="stride_in_1x1 applies to Bottleneck"):
        fusedres.resnet18(stride_in_1x1=True)


def test_fold_bn_leaves_norms_with_their_own_forward():
    """A BatchNorm2d subclass with its own forward (timm's BatchNormAct2d applies an
    activation too) is not a plain BN: fold_bn leaves it, says so, and the output is kept."""
    pytest.importorskip("timm")
    use(("cpp", "cpu"))
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchNormAct2d(8),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(UserWarning, match=r"1 normalization layer\(s\) left unfolded .*: 1$"):
        folded = fusedres.fold_bn(model)
    assert isinstance(folded[1], BatchNormAct2d) and isinstance(folded[3], torch.nn.Identity)
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32, DEEP)
