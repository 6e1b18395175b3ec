"""The CUDA kernels' merges of per-block partials (csrc/cuda/utils.cuh: the in-block tree, then
merge_partials_kernel), run in the emulation with the grids of an H100 (132 SMs): a channel's
statistics then come from hundreds of partial blocks: several passes of the merge kernel
(32 rows x 4 loads = 128 partials a pass), the last one partial. The other tests see the
emulated device's 2 SMs: a handful of partials, one pass."""
import pytest
import torch

from conftest import assert_close, has_layout, make, use
from fusedres import _cost

pytestmark = pytest.mark.emulated
EMULATED = ("cuda-emulated", "cpu")

# (dtype, shape, layout): channels_last float32 (4 channels a thread, 128 rows a block),
# bfloat16 (8 channels a thread, 256 rows a block), and channels-first float32. Each block of
# the statistics reduces at least 384 (float32) or 768 (bfloat16) rows (the partials' share of
# the bytes, csrc/cuda/utils.cuh): enough rows for more than 128 blocks.
SHAPES = [
    pytest.param(torch.float32, (8, 8, 90, 90), "channels_last", id="cl-float32"),
    pytest.param(torch.bfloat16, (16, 8, 80, 80), "channels_last", id="cl-bfloat16"),
    pytest.param(torch.float32, (16, 3, 120, 120), "nchw", id="nchw-float32"),
]


def ops():
    return torch.ops.fusedres_emulated


def skewed(shape, dtype, layout):
    """Random values whose mean drifts along H, so that every partial block has its own
    moments: a partial merged twice or dropped shows in the result."""
    x = make(shape, torch.float64, "cpu", layout, scale=2.0, offset=3.0)
    x = (x + torch.linspace(-4.0, 4.0, shape[2], dtype=torch.float64).view(1, 1, -1, 1)).to(dtype)
    assert has_layout(x, layout)
    return x


def run_h100(fn):
    """fn() under the H100 geometry; (its result, the first launch's partial blocks)."""
    with _cost.gpu_geometry(), _cost.count(aten=False) as c:
        result = fn()
    return result, c.launches[0].grid[1]


@pytest.mark.parametrize("dtype, shape, layout", SHAPES)
def test_stats_from_hundreds_of_partials(dtype, shape, layout):
    use(EMULATED)
    x = skewed(shape, dtype, layout)
    (mean, var), blocks = run_h100(lambda: ops().batch_norm_stats(x))
    assert blocks > 128 and blocks % 128 != 0, blocks  # passes of the merge, the last partial
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert_close(mean, ref_mean, torch.float32)
    assert_close(var, ref_var, torch.float32)
    # a fixed merge order: the same bits again
    (mean2, var2), _ = run_h100(lambda: ops().batch_norm_stats(x))
    assert torch.equal(mean, mean2) and torch.equal(var, var2)


@pytest.mark.parametrize("dtype, shape, layout", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "relu-mask"])
def test_backward_sums_from_hundreds_of_partials(dtype, shape, layout, masked):
    use(EMULATED)
    x = skewed(shape, dtype, layout)
    g = make(shape, dtype, "cpu", layout)
    y = make(shape, dtype, "cpu", layout) if masked else None
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    (sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias), blocks = run_h100(
        lambda: ops().batch_norm_backward_reduce(g, y, x, mean.float(), invstd.float(), True,
                                                 grad_dtype=torch.bfloat16))
    assert blocks > 128 and blocks % 128 != 0, blocks
    gd = g.double() if y is None else torch.where(y.double() > 0, g.double(), 0.0)
    assert torch.equal(masked_grad, gd.to(dtype))  # written by every block's threads
    xhat = (x.double() - mean.float().double().view(1, -1, 1, 1)) * invstd.float().double().view(
        1, -1, 1, 1)
    assert_close(sum_dy, gd.sum((0, 2, 3)), torch.float32)
    assert_close(sum_dy_xhat, (gd * xhat).sum((0, 2, 3)), torch.float32)
    # a bfloat16 model's parameter gradients: the same sums, rounded by the merge
    assert torch.equal(grad_weight, sum_dy_xhat.bfloat16())
    assert torch.equal(grad_bias, sum_dy.bfloat16())
    (sum_dy2, sum_dy_xhat2, _, *no_grads), _ = run_h100(
        lambda: ops().batch_norm_backward_reduce(g, y, x, mean.float(), invstd.float()))
    assert torch.equal(sum_dy, sum_dy2) and torch.equal(sum_dy_xhat, sum_dy_xhat2)
    assert [t.numel() for t in no_grads] == [0, 0]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_inf_nan_in_one_of_hundreds_of_partials(layout):
    """An Inf / NaN reaches the merge from one partial block among hundreds (or two, far
    apart, of opposite signs): the mean is +-Inf or NaN as PyTorch's, the variance NaN, and
    the other channels keep their accurate statistics."""
    use(EMULATED)
    dtype, shape = (torch.bfloat16, (16, 8, 80, 80)) if layout == "channels_last" else (
        torch.float32, (16, 4, 120, 120))
    x = skewed(shape, dtype, layout)
    N, _, H, W = shape
    x[N // 2, 1, H // 2, 7] = float("inf")  # one block in the middle
    x[0, 2, 0, 0] = float("-inf")  # the first block (its shift) ...
    x[N - 1, 2, H - 1, W - 1] = float("inf")  # ... and the last: Inf - Inf = NaN
    x[N - 1, 3, H // 3, 1] = float("nan")
    (mean, var), blocks = run_h100(lambda: ops().batch_norm_stats(x))
    assert blocks > 128, blocks
    # (torch.var_mean's Welford mean turns a lone Inf into NaN; F.batch_norm's is a sum)
    ref_mean = x.double().mean((0, 2, 3))
    ref_var = x.double().var((0, 2, 3), correction=0)
    assert mean[1].item() == float("inf") and mean[2].isnan() and mean[3].isnan()
    assert var[1:4].isnan().all()
    torch.testing.assert_close(mean.double(), ref_mean, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, equal_nan=True, rtol=1e-5, atol=1e-5)
    finite = torch.ones(shape[1], dtype=torch.bool)
    finite[1:4] = False
    assert_close(mean[finite], ref_mean[finite], torch.float32)
    assert_close(var[finite], ref_var[finite], torch.float32)
