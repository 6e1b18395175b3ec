"""Per-op speed: each fused op next to the unfused PyTorch sequence it replaces, on the same
inputs, after checking they agree."""
import pytest
import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF
from conftest import BATCH, DEVICE, DTYPE, GPU, channels_last

PROVIDERS = ["eager", "compile", "fusedres"] + (
    ["triton"] if GPU and fusedres.info()["available"]["triton"] else [])

# ResNet-50 BN inputs (C, H) and convolutions (C_in, C_out, kernel, stride, H_in).
BN_SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)] if GPU else [(64, 28)]
CONV_SHAPES = [
    (64, 256, 1, 1, 56), (64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 1024, 1, 1, 14),
    (512, 2048, 1, 1, 7),
] if GPU else [(32, 64, 1, 1, 28), (32, 32, 3, 1, 28)]


def bn_state(C):
    return (torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE),
            torch.rand(C, device=DEVICE, requires_grad=True),
            torch.randn(C, device=DEVICE, requires_grad=True))


def _eager_bn_act(x, residual, rm, rv, w, b):
    y = F.batch_norm(x, rm, rv, w, b, True)
    return torch.relu(y if residual is None else y + residual)


_compiled_bn_act = torch.compile(_eager_bn_act)


def bn_act(provider, x, state, residual=None):
    """relu(bn(x) (+ residual)) in training mode, by provider."""
    rm, rv, w, b = state
    if provider in ("eager", "compile"):
        fn = _eager_bn_act if provider == "eager" else _compiled_bn_act
        return fn(x, residual, rm, rv, w, b)
    with fusedres.backend("triton" if provider == "triton" else "auto"):
        if residual is None:
            return FF.batch_norm_relu(x, rm, rv, w, b, True)
        return FF.batch_norm_add_relu(x, residual, rm, rv, w, b, True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: f"C{s[0]}xH{s[1]}")
def test_bn_act_train_forward(timed, provider, residual, shape):
    C, H = shape
    x = channels_last((BATCH, C, H, H))
    z = channels_last((BATCH, C, H, H)) if residual else None
    state = bn_state(C)
    with torch.no_grad():
        fresh = lambda: (state[0].clone(), state[1].clone(), state[2], state[3])  # noqa: E731
        torch.testing.assert_close(bn_act(provider, x, fresh(), z).float(),
                                   bn_act("eager", x, fresh(), z).float(), atol=5e-2, rtol=5e-2)
        timed(lambda: bn_act(provider, x, state, z))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: f"C{s[0]}xH{s[1]}")
def test_bn_act_train_forward_backward(timed, provider, residual, shape):
    C, H = shape
    x = channels_last((BATCH, C, H, H), requires_grad=True)
    z = channels_last((BATCH, C, H, H), requires_grad=True) if residual else None
    grad = channels_last((BATCH, C, H, H))
    state = bn_state(C)
    leaves = (x, state[2], state[3]) + ((z,) if residual else ())

    def step():
        return torch.autograd.grad(bn_act(provider, x, state, z), leaves, grad)

    timed(step)


@pytest.mark.parametrize("provider", ["eager", "fusedres", "cudnn_conv_only"])
@pytest.mark.parametrize("residual", [False, True], ids=["bias_relu", "bias_add_relu"])
@pytest.mark.parametrize("conv", CONV_SHAPES, ids=lambda c: "{}to{}_k{}s{}_h{}".format(*c))
def test_folded_conv(timed, provider, residual, conv):
    """Folded inference block vs the unfused conv + bias (+ residual) + ReLU, and the bare conv."""
    cin, cout, k, stride, H = conv
    x = channels_last((BATCH, cin, H, H))
    w = (torch.randn(cout, cin, k, k, device=DEVICE) * 0.05).to(DTYPE).to(
        memory_format=torch.channels_last)
    b = torch.randn(cout, device=DEVICE, dtype=DTYPE)
    z = channels_last((BATCH, cout, H // stride, H // stride)) if residual else None

    def eager():
        y = F.conv2d(x, w, b, stride, k // 2)
        return torch.relu(y + z) if residual else torch.relu(y)

    def fused():
        if residual:
            return FF.conv_bias_add_relu(x, w, b, z, stride, k // 2)
        return FF.conv_bias_relu(x, w, b, stride, k // 2)

    def conv_only():
        return F.conv2d(x, w, None, stride, k // 2)

    with torch.no_grad():
        torch.testing.assert_close(fused().float(), eager().float(), atol=5e-2, rtol=5e-2)
        timed({"eager": eager, "fusedres": fused, "cudnn_conv_only": conv_only}[provider])
