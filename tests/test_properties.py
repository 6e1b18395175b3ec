"""Property-based tests (hypothesis): the fused BN ops and add_relu against the unfused
computation in float64 over random shapes (up to 80 channels), dtypes, layouts, momentum /
eps values (the dual form's shortcut BN with its own) and backends: outputs, gradients,
running statistics and counters. Derandomized (a fixed seed) by default;
FUSEDRES_HYPOTHESIS_EXAMPLES=N asks for more examples."""
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import fusedres.functional as FF  # noqa: E402
from conftest import HAS_TRITON, TOLERANCE, assert_close, rel_err, use  # noqa: E402

EXAMPLES = int(os.environ.get("FUSEDRES_HYPOTHESIS_EXAMPLES", "25"))
BACKENDS = ["cpp"] + (["triton"] if HAS_TRITON else [])


@st.composite
def bn_cases(draw):
    n = draw(st.integers(1, 4))
    # Up to 80 channels: three Triton channel blocks (32 in the interpreter).
    c = draw(st.one_of(st.integers(1, 9), st.integers(30, 80)))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    training = draw(st.booleans())
    if training and n * h * w == 1:
        n = 2  # one value per channel is an error in training (tested elsewhere)
    momentum = st.one_of(st.none(), st.floats(0.0, 1.0))
    eps = st.floats(1e-5, 1e-1)
    return dict(
        shape=(n, c, h, w),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        channels_last=draw(st.booleans()),
        training=training,
        momentum=draw(momentum),
        eps=draw(eps),
        # The shortcut BN of the dual form: its own momentum, eps and counter.
        residual_momentum=draw(momentum),
        residual_eps=draw(eps),
        residual_counter=draw(st.integers(0, 9)),
        relu=draw(st.booleans()),
        residual=draw(st.sampled_from(["none", "add", "dual"])),
        offset=draw(st.floats(-100.0, 100.0)),
        scale=draw(st.floats(0.01, 10.0)),
        backend=draw(st.sampled_from(BACKENDS)),
    )


def tensor(case, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(case["shape"], generator=g, dtype=torch.float64) * case["scale"]
         + case["offset"]).to(case["dtype"])
    t = t.to(memory_format=torch.channels_last) if case["channels_last"] else t
    return t.requires_grad_()


def stats(c, seed):
    """running_mean, running_var, weight, bias (the last two leaves of the autograd graph)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
            (torch.rand(c, generator=g) + 0.5).requires_grad_(),
            torch.randn(c, generator=g).requires_grad_()]


def unfused(case, x, z, p, q, nbt_p, nbt_q, dtype):
    """The unfused computation in `dtype` on copies of the statistics: (output, the copies)."""
    def bn(t, s, nbt, momentum, eps):
        s = [s[0].detach().to(dtype).clone(), s[1].detach().to(dtype).clone(),
             s[2].detach().to(dtype).requires_grad_(), s[3].detach().to(dtype).requires_grad_()]
        factor = momentum if momentum is not None else 1.0 / (nbt + 1)
        return F.batch_norm(t, s[0], s[1], s[2], s[3], case["training"], factor, eps), s

    x, z = (t.detach().to(dtype).requires_grad_() for t in (x, z))
    out, s_p = bn(x, p, nbt_p, case["momentum"], case["eps"])
    s_q = None
    if case["residual"] == "add":
        out = out + z
    elif case["residual"] == "dual":
        # residual_momentum=None means "as momentum" (a cumulative average only if both are).
        momentum = case["residual_momentum"]
        momentum = case["momentum"] if momentum is None else momentum
        bn_z, s_q = bn(z, q, nbt_q, momentum, case["residual_eps"])
        out = out + bn_z
    if case["relu"]:
        out = torch.relu(out)
    return out, (x, z), s_p, s_q


def leaves(case, x, z, s_p, s_q):
    """The tensors gradients flow to: x, weight, bias (+ residual) (+ its weight, bias)."""
    found = [x, s_p[2], s_p[3]]
    if case["residual"] != "none":
        found.append(z)
    if case["residual"] == "dual":
        found += [s_q[2], s_q[3]]
    return found


def tolerance(case, out32, out64, dtype):
    """ARCHITECTURE.md's tolerance, or 3x PyTorch's own float32 error where the case is
    ill-conditioned (a mean far larger than the spread, a tiny eps on a tiny variance)."""
    return {dtype: max(TOLERANCE[dtype], 3 * rel_err(out32, out64))}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(bn_cases())
def test_batch_norm_ops(case):
    """Output, gradients of every input, both running statistics and both counters."""
    use((case["backend"], "cpu"))
    c, dtype = case["shape"][1], case["dtype"]
    x, z = tensor(case, 1), tensor(case, 2)
    p, q = stats(c, 3), stats(c, 4)
    nbt_p, nbt_q = torch.tensor(3), torch.tensor(case["residual_counter"])
    kw = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"],
              relu=case["relu"], num_batches_tracked=nbt_p)
    ref64, inputs64, p64, q64 = unfused(case, x, z, p, q, 3, case["residual_counter"],
                                        torch.float64)
    # PyTorch's own unfused result in float32: how well-conditioned this case is.
    ref32, inputs32, p32, q32 = unfused(case, x, z, p, q, 3, case["residual_counter"],
                                        torch.float32)
    if case["residual"] == "none":
        out = FF.batch_norm_relu(x, *p, **kw)
    elif case["residual"] == "add":
        out = FF.batch_norm_add_relu(x, z, *p, **kw)
    else:
        out = FF.dual_batch_norm_add_relu(
            x, z, p[0], p[1], q[0], q[1], p[2], p[3], q[2], q[3],
            residual_momentum=case["residual_momentum"], residual_eps=case["residual_eps"],
            residual_num_batches_tracked=nbt_q, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref64, dtype, tolerance(case, ref32, ref64, dtype))

    # Gradients: of the same random cotangent (representable in dtype) through each of the
    # three computations.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(dtype).double()
    mine = leaves(case, x, z, p, q)
    got = torch.autograd.grad(out, mine, grad.to(dtype))
    exact = torch.autograd.grad(ref64, leaves(case, *inputs64, p64, q64), grad)
    own = torch.autograd.grad(ref32, leaves(case, *inputs32, p32, q32), grad.float())
    for g, g64, g32, leaf in zip(got, exact, own, mine):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        # A low-precision input's gradient is rounded once more than the output.
        gdtype = dtype if g.dtype == dtype else torch.float32
        bound = tolerance(case, g32, g64, gdtype)
        if gdtype in (torch.float16, torch.bfloat16):
            bound[gdtype] *= 2
        assert_close(g, g64, gdtype, bound)

    if case["training"]:
        checks = [(p, p64, nbt_p, 4)]
        if case["residual"] == "dual":
            checks.append((q, q64, nbt_q, case["residual_counter"] + 1))
        for s, s64, counter, count in checks:
            assert_close(s[0], s64[0], torch.float32, {torch.float32: 1e-4})
            assert_close(s[1], s64[1], torch.float32, {torch.float32: 1e-4})
            assert counter.item() == count


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(bn_cases())
def test_add_relu(case):
    use((case["backend"], "cpu"))
    x, z = tensor(case, 5).detach(), tensor(case, 6).detach()
    assert_close(FF.add_relu(x, z), torch.relu(x.double() + z.double()), case["dtype"])
