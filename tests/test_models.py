"""fusedres models and convert() / fold_bn() against torchvision's ResNets (the unfused
reference): state_dict compatibility, outputs, gradients and running statistics in training
and eval, cached folded weights, hooks. CPU, small inputs."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import torchvision  # a dependency of fusedres

import fusedres  # noqa: E402
from conftest import (assert_as_accurate, assert_close, assert_state_as_accurate,  # noqa: E402
                      each_close64, nudged, randomize_bn, use)

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "wide_resnet50_2"]
# Rounding differences compound through the depth of a network (torchvision's own float32
# result is about 3e-4 from float64 on ResNet-101 in training, 1.7e-3 on ResNet-152).
DEEP = {torch.float32: 2e-4}


def pair(arch, **kwargs):
    """(torchvision model, fusedres model) with the same weights."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(**kwargs)
    randomize_bn(reference)
    fused = getattr(fusedres, arch)(**kwargs)
    fused.load_state_dict(reference.state_dict(), strict=True)
    return reference, fused


def assert_same_state(a, b, tolerance=DEEP):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if sa[key].is_floating_point():
            assert_close(sb[key], sa[key], torch.float32, tolerance)
        else:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_torchvision_both_ways(arch):
    reference, fused = pair(arch)
    assert [(k, v.shape) for k, v in reference.state_dict().items()] == \
           [(k, v.shape) for k, v in fused.state_dict().items()]
    reference.load_state_dict(fused.state_dict(), strict=True)
    capitalised = {"resnext50_32x4d": "ResNeXt50_32x4d", "wide_resnet50_2": "WideResNet50_2"}
    assert getattr(fusedres, capitalised.get(arch, arch.replace("resnet", "ResNet"))) is \
        getattr(fusedres, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_matches_torchvision(arch, mode):
    use(("cpp", "cpu"))
    reference, fused = pair(arch, num_classes=10)
    check_forward(reference, fused, torch.randn(2, 3, 64, 64), mode)


def check_forward(reference, fused, x, mode):
    """One forward in `mode`: output, running statistics and num_batches_tracked as accurate
    as torchvision's float32."""
    reference64 = copy.deepcopy(reference).double()
    for model in (reference, fused, reference64):
        getattr(model, mode)()
    assert_as_accurate(fused(x), reference(x), reference64(x.double()))
    assert_state_as_accurate(fused, reference, reference64)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_match_torchvision(arch, channels_last):
    """Loss, gradients, parameters, running statistics and num_batches_tracked through three
    SGD steps, as accurate (against float64) as torchvision's own float32 training. Training
    amplifies rounding differences chaotically (BN over a few values per channel in layer4;
    some BN-parameter gradients are off by 3% in torchvision's own float32), hence a looser
    bound than for one forward: still far below the O(1) error of a wrong formula."""
    use(("cpp", "cpu"))
    reference, fused = pair(arch, num_classes=10)
    reference64 = copy.deepcopy(reference).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.to(memory_format=fmt) for m in (reference, fused, reference64)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]

    def flat(model, what):
        if what == "grad":
            return torch.cat([p.grad.double().flatten() for p in model.parameters()])
        return torch.cat([t.double().flatten() for t in model.state_dict().values()
                          if t.is_floating_point()])

    for step in range(3):
        x = torch.randn(4, 3, 48, 48).to(memory_format=fmt)
        target = torch.randint(0, 10, (4,))
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            inputs = x.double() if model is reference64 else x
            model.loss = F.cross_entropy(model(inputs), target)
            model.loss.backward()
        assert_as_accurate(fused.loss, reference.loss, reference64.loss, floor=1e-2, factor=10)
        assert_as_accurate(flat(fused, "grad"), flat(reference, "grad"), flat(reference64, "grad"),
                           floor=1e-2, factor=10)
        for optimizer in optimizers:
            optimizer.step()
    assert_as_accurate(flat(fused, "state"), flat(reference, "state"), flat(reference64, "state"),
                       floor=1e-2, factor=10)
    assert fused.layer1[0].bn1.num_batches_tracked.item() == 3
    assert torch.equal(fused.state_dict()["layer1.0.bn1.num_batches_tracked"],
                       reference.state_dict()["layer1.0.bn1.num_batches_tracked"])


def test_no_grad_in_train_mode_updates_running_stats():
    """Training-mode forwards under no_grad / inference_mode update the running statistics as
    torchvision's do: each as accurate (against float64) as torchvision's float32. (Deep in
    the network a batch of 2 at 1x1 leaves 2 values per channel: ill-conditioned, so a fixed
    tolerance against torchvision's float32 would measure torchvision's rounding too.)"""
    use(("cpp", "cpu"))
    reference, fused = pair("resnet18")
    reference64 = copy.deepcopy(reference).double()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for model in (reference, fused, reference64):
            model(x.to(next(model.parameters()).dtype))
    with torch.inference_mode():
        for model in (reference, fused, reference64):
            model(x.to(next(model.parameters()).dtype))
    assert_state_as_accurate(fused, reference, reference64)
    assert fused.bn1.num_batches_tracked.item() == 2


def test_eval_refreshes_folded_weights():
    """Folded weights are cached in eval under no_grad, and never stale: an optimizer step,
    a running-stat change, load_state_dict and .to() all show in the next output."""
    use(("cpp", "cpu"))
    reference, fused = pair("resnet18", num_classes=10)
    reference.eval()
    fused.eval()
    x = torch.randn(2, 3, 32, 32)

    def check():
        with torch.no_grad():
            assert_close(fused(x), reference(x), torch.float32, DEEP)

    check()
    check()  # from the cache
    for model in (reference, fused):  # an optimizer step on a conv and a BN
        optimizer = torch.optim.SGD([model.layer1[0].conv1.weight, model.layer2[0].bn2.weight],
                                    lr=0.5)
        model.layer1[0].conv1.weight.grad = torch.ones_like(model.layer1[0].conv1.weight)
        model.layer2[0].bn2.weight.grad = torch.ones_like(model.layer2[0].bn2.weight)
        optimizer.step()
    check()
    with torch.no_grad():
        for model in (reference, fused):
            model.layer3[1].bn1.running_mean.add_(0.5)
    check()
    other, _ = pair("resnet18", num_classes=10)
    other.layer4[0].downsample[1].running_var.mul_(3)
    reference.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    check()
    reference.double()
    fused.double()
    x = x.double()
    with torch.no_grad():
        assert_close(fused(x), reference(x), torch.float64, {torch.float64: 1e-9})


def test_eval_gradients_flow_through_folding():
    """Fine-tuning with BN in eval mode: gradients reach conv and BN parameters."""
    use(("cpp", "cpu"))
    reference, fused = pair("resnet18", num_classes=10)
    reference.eval()
    fused.eval()
    x = torch.randn(2, 3, 32, 32)
    reference(x).sum().backward()
    fused(x).sum().backward()
    for p, q in zip(reference.parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, torch.float32, {torch.float32: 2e-3})


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_torchvision_model(mode, capsys):
    use(("cpp", "cpu"))
    reference, _ = pair("resnet50", num_classes=10)
    reference64 = copy.deepcopy(reference).double()
    calls = []
    reference.fc.register_forward_hook(lambda *args: calls.append("fc"))
    reference.layer2[1].register_forward_hook(lambda *args: calls.append("block"))
    converted = fusedres.convert(copy.deepcopy(reference), verbose=True)
    assert "17 module(s) converted" in capsys.readouterr().out  # 16 blocks + the ResNet
    assert isinstance(converted, fusedres.ResNet)
    assert isinstance(converted.layer3[0], fusedres.nn.Bottleneck)
    assert list(converted.state_dict()) == list(reference.state_dict())
    for model in (reference, converted, reference64):
        getattr(model, mode)()
    x = torch.randn(2, 3, 48, 48)
    assert_as_accurate(converted(x), reference(x), reference64(x.double()))
    assert calls == ["block", "fc", "block", "fc"]  # hooks kept on the converted model
    assert_state_as_accurate(converted, reference, reference64)


def test_convert_leaves_unknown_modules_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    converted = fusedres.convert(model)
    assert [type(m) for m in converted] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]


@pytest.mark.parametrize("source", ["fusedres", "converted"])
def test_fold_bn(source):
    use(("cpp", "cpu"))
    reference, fused = pair("resnet50", num_classes=10)
    model = fused if source == "fusedres" else fusedres.convert(copy.deepcopy(reference))
    with pytest.raises(RuntimeError, match="training mode"):
        fusedres.fold_bn(model)
    reference.eval()
    model.eval()
    folded = fusedres.fold_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_close(folded(x), reference(x), torch.float32, DEEP)


def grads(model):
    return [(name, p.grad) for name, p in model.named_parameters()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_training_matches_torchvision(arch, channels_last):
    """A training step in float64 with BNs of eps=1e-3 and momentum=0.3, then an eval
    forward and backward: the output, the gradient of every parameter, and after the SGD
    step every parameter and buffer, each within 1e-10 of torchvision's float64 (no tolerance
    borrowed from float32 rounding: a wrong term anywhere shows), or within 10x the noise of a
    nudged twin of torchvision where that is more (ResNet-50's eval output after the step: a
    one-ulp nudge of the parameters moves it by 1e-10 to 3e-10). One training step only: the
    next one's BN gradients over a few values per channel are ill-conditioned (about 6e-8
    apart between torchvision in NCHW and in channels_last)."""
    use(("cpp", "cpu"))
    norm = functools.partial(torch.nn.BatchNorm2d, eps=1e-3, momentum=0.3)
    reference, fused = pair(arch, num_classes=10, norm_layer=norm)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.double().to(memory_format=fmt) for m in (reference, fused)]
    twin = nudged(reference)
    models.append(twin)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for mode in ("train", "eval"):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64).to(memory_format=fmt)
        target = torch.randint(0, 10, (4,))
        outs = []
        for model, optimizer in zip(models, optimizers):
            getattr(model, mode)()
            optimizer.zero_grad()
            outs.append(model(x))
            F.cross_entropy(outs[-1], target).backward()
        each_close64([("output", outs[1])], [("output", outs[0])], noise=[("output", outs[2])])
        each_close64(grads(fused), grads(reference), noise=grads(twin))
        if mode == "train":
            for optimizer in optimizers:
                optimizer.step()
            each_close64(fused.state_dict().items(), reference.state_dict().items(),
                         noise=twin.state_dict().items())


@pytest.mark.parametrize("momenta", [(0.1, None), (None, 0.3)], ids=["ema-cma", "cma-ema"])
def test_shortcut_bn_with_another_momentum(momenta):
    """A downsampling block whose main BN and shortcut BN average differently (one an
    exponential average, the other cumulative, momentum=None): three training forwards in
    float64, outputs and every buffer within 1e-10 of torchvision's."""
    use(("cpp", "cpu"))
    reference, fused = pair("resnet18", num_classes=10)
    for model in (reference, fused):
        model.double()
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momenta[1] if "downsample" in name else momenta[0]
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        assert_close(fused(x), reference(x), torch.float64)
    each_close64(fused.state_dict().items(), reference.state_dict().items())


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_frozen_batch_norm(eps):
    """torchvision.ops.FrozenBatchNorm2d (detectron2 style) is a fixed affine, also in
    training, with its own eps: float64 outputs and parameter gradients within 1e-10 in train
    and eval mode, and after fold_bn."""
    use(("cpp", "cpu"))
    frozen = functools.partial(torchvision.ops.FrozenBatchNorm2d, eps=eps)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10, norm_layer=frozen).double()
    for m in reference.modules():
        if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.01, 0.05)  # where eps 1e-3 against 1e-5 shows
            m.weight.uniform_(0.5, 1.5)
    converted = fusedres.convert(copy.deepcopy(reference))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in ("train", "eval"):
        for model in (reference, converted):
            getattr(model, mode)()
            model.zero_grad()
            model(x).sum().backward()
        assert_close(converted(x), reference(x), torch.float64)
        each_close64(grads(converted), grads(reference))
    folded = fusedres.fold_bn(converted.eval())
    with torch.no_grad():
        assert_close(folded(x), reference(x), torch.float64, {torch.float64: 1e-9})


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stride_in_1x1(mode):
    """ResNet v1 (paper / Keras): the stride in the first 1x1 of a downsampling block."""
    use(("cpp", "cpu"))
    reference, _ = pair("resnet50", num_classes=10)
    fused = fusedres.ResNet50(num_classes=10, stride_in_1x1=True)
    fused.load_state_dict(reference.state_dict())
    for block in reference.modules():  # the same layout on the torchvision side, by hand
        if isinstance(block, torchvision.models.resnet.Bottleneck) and block.stride != 1:
            block.conv1.stride, block.conv2.stride = (block.stride,) * 2, (1, 1)
    assert fused.layer2[0].conv1.stride == (2, 2) and fused.layer2[0].conv2.stride == (1, 1)
    getattr(reference, mode)()
    getattr(fused, mode)()
    x = torch.randn(2, 3, 64, 64)
    assert_close(fused(x), reference(x), torch.float32, DEEP)
    with pytest.raises(ValueError, match="stride_in_1x1 applies to Bottleneck"):
        fusedres.ResNet18(stride_in_1x1=True)


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_triton_backend_resnet18(mode):
    """The whole model on the Triton kernels (interpreter on the CPU: a small input)."""
    use(("triton", "cpu") if not torch.cuda.is_available() else ("triton", "cuda"))
    reference, fused = pair("resnet18", num_classes=10)
    check_forward(reference, fused, torch.randn(2, 3, 32, 32), mode)


def test_compile_fullgraph_train_and_eval():
    use(("cpp", "cpu"))
    torch._dynamo.reset()
    reference, fused = pair("resnet18", num_classes=10)
    compiled_model = copy.deepcopy(fused)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    for mode in ["train", "eval"]:
        getattr(fused, mode)()
        getattr(compiled_model, mode)()
        assert_close(compiled(x), fused(x), torch.float32, DEEP)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_bfloat16(mode):
    """Under autocast the fused model computes in bfloat16 like torchvision does, and is as
    accurate (against float64)."""
    use(("cpp", "cpu"))
    reference, fused = pair("resnet50", num_classes=10)
    reference64 = copy.deepcopy(reference).double()
    for model in (reference, fused, reference64):
        getattr(model, mode)()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), reference(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_as_accurate(out, ref, reference64(x.double()))


def test_export_eval_model():
    use(("cpp", "cpu"))
    reference, fused = pair("resnet18", num_classes=10)
    fused.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(fused, (x,))
    assert any("fusedres" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        assert_close(exported.module()(x), reference(x), torch.float32, DEEP)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_norm_layer_runs_unfused(mode):
    """norm_layer=GroupNorm (torchvision allows any): those layers run as their own modules."""
    use(("cpp", "cpu"))
    norm = lambda c: torch.nn.GroupNorm(4, c)  # noqa: E731
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10, norm_layer=norm)
    fused = fusedres.ResNet18(num_classes=10, norm_layer=norm)
    fused.load_state_dict(reference.state_dict())
    getattr(reference, mode)()
    getattr(fused, mode)()
    x = torch.randn(2, 3, 32, 32)
    assert_close(fused(x), reference(x), torch.float32, DEEP)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_timm_resnet(arch, mode):
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False, num_classes=10)
    converted = fusedres.convert(copy.deepcopy(reference))
    assert type(converted.layer1[0]).__name__.startswith("Fused")
    assert list(converted.state_dict()) == list(reference.state_dict())
    check_forward(reference, converted, torch.randn(2, 3, 64, 64), mode)


def test_convert_keeps_timm_forward_for_blocks_it_does_not_fuse():
    timm = pytest.importorskip("timm")
    use(("cpp", "cpu"))
    torch.manual_seed(0)
    reference = timm.create_model("seresnet50", pretrained=False, num_classes=10).eval()
    converted = fusedres.convert(copy.deepcopy(reference))
    x = torch.randn(1, 3, 64, 64)
    assert_close(converted(x), reference(x), torch.float32, DEEP)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet50_on_the_gpu_at_224(backend, dtype, mode):
    """ResNet-50 at full resolution, channels_last, under autocast, on the GPU backends."""
    use((backend, "cuda"))
    reference, fused = pair("resnet50")
    reference64 = copy.deepcopy(reference).double().cuda()
    reference, fused = [m.cuda().to(memory_format=torch.channels_last) for m in (reference, fused)]
    for model in (reference, fused, reference64):
        getattr(model, mode)()
    x = torch.randn(8, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out, ref = fused(x), reference(x)
    assert out.dtype == dtype
    assert_as_accurate(out, ref, reference64(x.double()))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_eps_and_momentum_of_the_modules_are_used(arch, mode):
    """The fused blocks read each BN module's own eps and momentum (an eps of 1e-3 moves the
    output far beyond the float32 tolerance; momentum 0.3 the running statistics), also in
    the downsample's BN of the dual form."""
    use(("cpp", "cpu"))
    norm = functools.partial(torch.nn.BatchNorm2d, eps=1e-3, momentum=0.3)
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(num_classes=10, norm_layer=norm)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_var.uniform_(0.05, 0.1)  # eps 1e-3 moves each BN by ~1%
    fused = fusedres.convert(copy.deepcopy(reference))
    check_forward(reference, fused, torch.randn(2, 3, 32, 32), mode)
