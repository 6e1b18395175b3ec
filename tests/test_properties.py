"""Property-based tests (hypothesis): the fused BN ops and add_relu against the unfused
computation in float64 over random shapes, dtypes, layouts, momentum / eps values and
backends. Derandomized (a fixed seed) by default; FUSEDRES_HYPOTHESIS_EXAMPLES=N asks for more
examples."""
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
    c = draw(st.integers(1, 9))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    training = draw(st.booleans())
    if training and n * h * w == 1:
        n = 2  # one value per channel is an error in training (tested elsewhere)
    return dict(
        shape=(n, c, h, w),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        channels_last=draw(st.booleans()),
        training=training,
        momentum=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        eps=draw(st.floats(1e-5, 1e-1)),
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
    return t.to(memory_format=torch.channels_last) if case["channels_last"] else t


def stats(c, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
            torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(bn_cases())
def test_batch_norm_ops(case):
    use((case["backend"], "cpu"))
    c = case["shape"][1]
    x, z = tensor(case, 1), tensor(case, 2)
    p, q = stats(c, 3), stats(c, 4)
    nbt_p, nbt_q = torch.tensor(3), torch.tensor(3)
    ref_p, ref_q = [t.double().clone() for t in p], [t.double().clone() for t in q]

    def ref_bn(t, s, nbt, dtype=torch.float64):
        factor = case["momentum"] if case["momentum"] is not None else 1.0 / (nbt + 1)
        return F.batch_norm(t.to(dtype), s[0], s[1], s[2], s[3], case["training"], factor,
                            case["eps"])

    # PyTorch's own unfused result in float32: how well-conditioned this case is.
    torch32 = ref_bn(x, [t.float().clone() for t in p], 3, torch.float32)
    ref = ref_bn(x, ref_p, 3)
    kw = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"],
              relu=case["relu"], num_batches_tracked=nbt_p)
    if case["residual"] == "none":
        out = FF.batch_norm_relu(x, *p, **kw)
    elif case["residual"] == "add":
        ref, torch32 = ref + z.double(), torch32 + z.float()
        out = FF.batch_norm_add_relu(x, z, *p, **kw)
    else:
        ref = ref + ref_bn(z, ref_q, 3)
        torch32 = torch32 + ref_bn(z, [t.float().clone() for t in q], 3, torch.float32)
        out = FF.dual_batch_norm_add_relu(x, z, p[0], p[1], q[0], q[1], p[2], p[3], q[2], q[3],
                                          residual_num_batches_tracked=nbt_q, **kw)
    if case["relu"]:
        ref, torch32 = torch.relu(ref), torch.relu(torch32)
    assert out.dtype == case["dtype"] and out.shape == x.shape
    # ARCHITECTURE.md's tolerance, or 3x PyTorch's own float32 error where the case is
    # ill-conditioned (a mean far larger than the spread, a tiny eps on a tiny variance).
    tolerance = max(TOLERANCE[case["dtype"]], 3 * rel_err(torch32, ref))
    assert_close(out, ref, case["dtype"], {case["dtype"]: tolerance})
    if case["training"]:
        assert_close(p[0], ref_p[0], torch.float32, {torch.float32: 1e-4})
        assert_close(p[1], ref_p[1], torch.float32, {torch.float32: 1e-4})
        assert nbt_p.item() == 4


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(bn_cases())
def test_add_relu(case):
    use((case["backend"], "cpu"))
    x, z = tensor(case, 5), tensor(case, 6)
    assert_close(FF.add_relu(x, z), torch.relu(x.double() + z.double()), case["dtype"])
