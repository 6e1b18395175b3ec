"""fusedres.freeze: the CPU inference snapshot with BN folded and oneDNN-prepacked convolution
weights, against the unfrozen eval model in float64 (the truth) and float32 (PyTorch's own
rounding), and its frozen-model semantics: a snapshot that later weight writes do not reach,
no backward, copies and pickles that work, clear errors."""
import copy
import io

import pytest
import torch
import torchvision

import fusedres
from conftest import assert_as_accurate, randomize_bn, use
from fusedres import frozen as F

pytestmark = pytest.mark.skipif(not F.available(), reason="this torch has no oneDNN")


def eval_model(arch="resnet18", **kwargs):
    """A torchvision model in eval mode with non-trivial BN statistics and affine."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(**kwargs)
    randomize_bn(model)
    return model.eval()


def check(frozen, model, x):
    """frozen(x) as accurate as model(x) in float32, against model(x) in float64."""
    with torch.no_grad():
        out = frozen(x)
        assert_as_accurate(out, model(x), copy.deepcopy(model).double()(x.double()))
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_model(arch, channels_last):
    use(("cpp", "cpu"))
    model = eval_model(arch, num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    frozen = fusedres.freeze(fusedres.convert(copy.deepcopy(model)))
    packed = [m for m in frozen.modules() if isinstance(m, F.PackedConv2d)]
    assert len(packed) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert type(frozen) is torchvision.models.ResNet  # plain classes: the folded forward
    check(frozen, model, x)
    check(frozen, model, torch.randn(3, 3, 40, 56))  # another shape: another packed weight
    check(frozen, model, torch.randn(3, 3, 96, 96)[:, :, ::2, ::2])  # a strided input


def test_dilated_and_timm_models():
    use(("cpp", "cpu"))
    model = eval_model("resnet50", num_classes=10,
                       replace_stride_with_dilation=[False, True, True])
    check(fusedres.freeze(model), model, torch.randn(2, 3, 48, 48))
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet50d", pretrained=False, num_classes=10).eval()
    check(fusedres.freeze(fusedres.convert(copy.deepcopy(model))), model,
          torch.randn(2, 3, 64, 64))


def test_a_snapshot():
    """Later writes to the original (through .data, as EMA and pruning tools do, which no
    version counter sees) do not reach the frozen model; freezing again picks them up. The
    frozen convolutions have no parameters, so nothing else can write them."""
    model = eval_model()
    frozen = fusedres.freeze(model)
    assert isinstance(model.layer1[0].bn1, torch.nn.BatchNorm2d)  # the argument is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = frozen(x)
        model.layer1[0].conv1.weight.data.mul_(2)
        model.layer1[0].bn1.running_var.data.mul_(3)
        assert torch.equal(frozen(x), before)
    check(fusedres.freeze(model), model, x)
    conv = frozen.layer1[0].conv1
    assert list(conv.parameters()) == [] and not hasattr(conv, "weight")
    assert not any(".conv" in key for key in frozen.state_dict())
    assert any(key.startswith("fc.") for key in frozen.state_dict())


def test_packed_weights_kept_per_shape():
    model = eval_model()
    frozen = fusedres.freeze(model)
    conv = frozen.layer1[0].conv1
    with torch.no_grad():
        for n in range(1, 12):
            check(frozen, model, torch.randn(n, 3, 32, 32))
    assert len(conv._packed) == F._SHAPES_KEPT  # bounded: the oldest shapes went
    assert (11, 64, 8, 8) in conv._packed and (1, 64, 8, 8) not in conv._packed


def test_inference_only():
    model = eval_model()
    frozen = fusedres.freeze(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        frozen(x)
    with torch.no_grad():
        frozen(x)
    with pytest.raises(RuntimeError, match="training mode"):
        fusedres.freeze(model.train())


def test_copy_and_pickle():
    model = eval_model()
    frozen = fusedres.freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = frozen(x)
        assert torch.equal(copy.deepcopy(frozen)(x), out)
        buffer = io.BytesIO()
        torch.save(frozen, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), out)


def test_dtypes():
    model = eval_model()
    frozen = fusedres.freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="frozen in torch.float32"):
        frozen(x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # the convolutions keep the dtype they were frozen in; fc runs in bfloat16
        assert_as_accurate(frozen(x).float(), model(x), model.double()(x.double()), floor=2e-2)
    model = eval_model()
    frozen = fusedres.freeze(copy.deepcopy(model).bfloat16())
    with torch.no_grad():
        out = frozen(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert_as_accurate(out, model(x), model.double()(x.double()), floor=3e-2)


def test_bad_input():
    frozen = fusedres.freeze(eval_model())
    with pytest.raises(ValueError, match="3 input channels got shape"):
        frozen(torch.randn(2, 4, 32, 32))
    with pytest.raises(RuntimeError, match="4-D CPU tensor"):
        frozen(torch.randn(3, 32, 32))


def test_without_onednn(monkeypatch):
    """Without oneDNN, freeze is fold_bn's result (plain convolutions, BN folded)."""
    monkeypatch.setattr(F, "available", lambda: False)
    model = eval_model()
    frozen = fusedres.freeze(model)
    assert not any(isinstance(m, F.PackedConv2d) for m in frozen.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    check(frozen, model, torch.randn(2, 3, 32, 32))


def test_leaves_what_it_cannot_pack():
    """A conv with a hook, a float64 conv: folded or not, unpacked, and still right. A model
    on another device is fold_bn's result (its fused epilogues run there)."""
    model = eval_model()
    model.layer1[0].conv2.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"1 normalization layer.* left unfolded .*: layer1.0.bn2"):
        frozen = fusedres.freeze(model)
    assert type(frozen.layer1[0].conv2) is torch.nn.Conv2d
    assert isinstance(frozen.layer1[0].conv1, F.PackedConv2d)
    check(frozen, model, torch.randn(2, 3, 32, 32))
    model64 = eval_model().double()
    frozen64 = fusedres.freeze(model64)
    assert not any(isinstance(m, F.PackedConv2d) for m in frozen64.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen64(x), model64(x))
    meta = fusedres.freeze(fusedres.convert(eval_model().to("meta")))
    assert not any(isinstance(m, F.PackedConv2d) for m in meta.modules())
    assert type(meta) is fusedres.ResNet
