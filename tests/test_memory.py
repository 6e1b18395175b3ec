"""Memory and indexing:
- no growth over many iterations: live torch.Tensor objects, the state held by
  the modules and (on a GPU) torch.cuda.memory_allocated stay flat after warm-up, for a model
  (training and eval steps) and for the functional ops with autograd;
- tensors of more than 2**31 elements (64-bit indexing) on the cuda and triton backends,
  checked slice by slice against a float64 reference (GPU, slow);
- the peak memory of a ResNet-50 training step against torchvision eager (GPU, slow)."""
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NATIVE_TARGETS, TARGETS, TOLERANCE, rel_err, use

import fusedres
import fusedres.functional as FF

try:
    import triton
    import triton.language as tl
    from fusedres.kernels._common import tile_offsets
except ImportError:  # no Triton: the tests marked `triton` are skipped
    triton = None

MODEL_TARGETS = NATIVE_TARGETS + [t for t in TARGETS if t.id == "triton-cuda"]


def live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def module_state(model):
    """Every module's attribute names and the ids of the tensors it holds: a cache kept on a
    module (fusedres keeps none) would show here."""
    return [(name, sorted(m.__dict__), sorted(id(t) for t in m.__dict__.values()
                                              if isinstance(t, torch.Tensor)))
            for name, m in model.named_modules()]


def allocated(device):
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("target", MODEL_TARGETS)
def test_model_steps_do_not_grow_memory(target):
    """50 training steps, 50 eval steps, then alternating steps: nothing accumulates, and no
    module gains an attribute (no cache of folded weights or anything else)."""
    device = use(target)
    torch.manual_seed(0)
    model = fusedres.models.ResNet(fusedres.nn.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 16, 16, device=device)
    labels = torch.randint(0, 10, (2,), device=device)

    def train(steps):
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()

    def evaluate(steps):
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                model(x)
        model(x).sum().backward()  # eval with autograd

    def snapshot():
        return live_tensors(), module_state(model), allocated(device)

    fresh = module_state(model)
    train(3)
    evaluate(3)
    before = snapshot()
    train(50)
    evaluate(50)
    for _ in range(10):
        train(1)
        evaluate(1)
    after = snapshot()
    assert fresh == before[1] == after[1], "a module gained state"
    assert after[0] <= before[0], f"live tensors grew from {before[0]} to {after[0]}"
    assert after[2] == before[2], f"CUDA memory grew from {before[2]} to {after[2]} bytes"


@pytest.mark.parametrize("target", TARGETS)
def test_functional_ops_do_not_grow_memory(target):
    """Every fused op, forward and backward, over many iterations."""
    device = use(target)
    iterations = 10 if target == ("triton", "cpu") else 50
    shape, C = (4, 6, 5, 5), 6

    def channel(requires_grad=False):
        return (torch.rand(C, device=device) + 0.5).requires_grad_(requires_grad)

    rm, rv, rm2, rv2, rm_eval, rv_eval = (channel() for _ in range(6))
    w, b, w2, b2 = (channel(True) for _ in range(4))
    nbt = torch.zeros((), dtype=torch.long, device=device)
    conv_weight = torch.randn(C, C, 3, 3, device=device, requires_grad=True)

    def step():
        x = torch.randn(shape, device=device, requires_grad=True)
        z = torch.randn(shape, device=device, requires_grad=True)
        weight, bias = FF.fold_conv_bn(conv_weight, None, rm, rv, 1e-5, w, b)
        outs = [
            FF.batch_norm_relu(x, rm, rv, w, b, True, num_batches_tracked=nbt),
            FF.batch_norm_relu(x, rm_eval, rv_eval, w, b, False),  # saves a copy of rm_eval
            FF.batch_norm_add_relu(x, z, rm, rv, w, b, True),
            FF.dual_batch_norm_add_relu(x, z, rm, rv, rm2, rv2, w, b, w2, b2, True),
            FF.add_relu(x, z),
            FF.conv_bias_add_relu(x, weight, bias, z, padding=1),
        ]
        sum(o.sum() for o in outs).backward()

    for _ in range(3):
        step()
    before = live_tensors(), allocated(device)
    for _ in range(iterations):
        step()
    after = live_tensors(), allocated(device)
    assert nbt.item() == iterations + 3
    assert after[0] <= before[0], f"live tensors grew from {before[0]} to {after[0]}"
    assert after[1] == before[1], f"CUDA memory grew from {before[1]} to {after[1]} bytes"


# ---- more than 2**31 elements (GPU) ---------------------------------------------------------

if triton is not None:
    @triton.jit
    def _tile_offsets_kernel(out_ptr, row0, C, INNER: tl.constexpr):
        rows = row0 + tl.arange(0, 4).to(tl.int64)
        cols = C - 2 + tl.arange(0, 2).to(tl.int64)  # the last two channels
        offsets = tile_offsets(rows, cols, C, INNER)
        tl.store(out_ptr + tl.arange(0, 4)[:, None] * 2 + tl.arange(0, 2)[None, :], offsets)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("C, inner, row0", [
    (2**16, 2**16, 3 * 2**16 + 5),  # channels-first, C * inner = 2**32: wraps to 0 in int32
    (3, 2**30 - 4, 2**30 + 3),  # channels-first, C * inner = 3.2e9
    (2**16 + 1, 1, 2**16 + 3),  # channels_last, row * C > 2**32
])
def test_triton_tile_offsets_are_64_bit(device, C, inner, row0):
    """The element offsets of every Triton BN kernel, for tensors past 2**31 elements, with
    C passed as a 32-bit int (Triton's default for small ints), H * W a 32-bit constant. Runs
    on the CPU in the interpreter: no 8 GB tensor needed."""
    out = torch.empty(4, 2, dtype=torch.int64, device=device)
    _tile_offsets_kernel[(1,)](out, row0, C, inner)
    expected = [[(r // inner) * C * inner + r % inner + c * inner for c in (C - 2, C - 1)]
                for r in range(row0, row0 + 4)]
    assert out.cpu().tolist() == expected


# bfloat16, each tensor 4.3 GB (8.6 GB for the last): N * C * H * W > 2**31, and one sample
# alone > 2**31 (C * H * W overflows a 32-bit product).
BIG_SHAPES = {
    "nchw": (2**31 // (64 * 128 * 128) + 1, 64, 128, 128),
    "channels_last": (2**31 // (64 * 128 * 128) + 1, 64, 128, 128),
    "one-sample-over-2**31": (2, 2, 2**15, 2**15 + 8),
}
BIG_OPS = {  # op: tensors of the input's size alive at once
    "batch_norm_relu_train": 4,  # x, out, grad_out, grad_input
    "batch_norm_relu_eval": 2,
    "batch_norm_add_relu_train": 3,
    "add_relu": 3,
}


def slices(shape, limit=2**26):
    """Index tuples cutting a tensor of `shape` into pieces of at most about `limit` values:
    groups of whole samples, or bands of rows of one sample."""
    per_sample = math.prod(shape[1:])
    if per_sample <= limit:
        step = limit // per_sample
        return [(slice(n, n + step),) for n in range(0, shape[0], step)]
    step = max(1, limit // (per_sample // shape[2]))
    return [(slice(n, n + 1), slice(None), slice(h, h + step))
            for n in range(shape[0]) for h in range(0, shape[2], step)]


def column(v):
    return v.view(1, -1, 1, 1)


def channel_stats(x):
    """Per-channel mean and biased variance in float64, two passes, slice by slice."""
    count = x.numel() // x.shape[1]
    dims = (0, 2, 3)
    mean = sum(x[i].double().sum(dims) for i in slices(x.shape)) / count
    m2 = sum(((x[i].double() - column(mean)) ** 2).sum(dims) for i in slices(x.shape))
    return mean, m2 / count


def assert_slices_close(out, reference, inputs, tolerance):
    """out matches reference(*float64 slices of inputs) on every slice (a wrapped index
    shows as a wrong slice, however small)."""
    for i in slices(out.shape):
        err = rel_err(out[i], reference(*(t[i].double() for t in inputs)))
        assert err <= tolerance, f"slice {i}: relative error {err:.3g} > {tolerance}"


@pytest.fixture
def cuda_memory():
    """Frees the GPU memory of a test afterwards."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("layout", list(BIG_SHAPES))
@pytest.mark.parametrize("op", list(BIG_OPS))
def test_more_than_2_31_elements(backend, layout, op, cuda_memory):
    use((backend, "cuda"))
    shape = BIG_SHAPES[layout]
    numel = math.prod(shape)
    assert numel > 2**31
    free, _ = torch.cuda.mem_get_info()
    need = BIG_OPS[op] * numel * 2 + 4 * 2**30
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    C = shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)

    def data(means, spread):
        t = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=fmt)
        t.normal_(generator=g)
        return t.mul_(column(spread).to(t.dtype)).add_(column(means).to(t.dtype))

    means = torch.linspace(-3, 3, C, device="cuda")
    spread = torch.linspace(0.5, 2, C, device="cuda")
    w = torch.linspace(0.5, 1.5, C, device="cuda")
    b = torch.linspace(-1, 1, C, device="cuda")
    tol = TOLERANCE[torch.bfloat16]
    x = data(means, spread)

    if op == "add_relu":
        z = data(-means, spread)
        out = FF.add_relu(x, z)
        assert out.is_contiguous(memory_format=fmt)
        assert_slices_close(out, lambda x, z: torch.relu(x + z), (x, z), tol)
        return
    if op == "batch_norm_relu_eval":
        rm, rv = means.clone(), spread**2
        out = FF.batch_norm_relu(x, rm, rv, w, b, training=False)
        scale = w.double() / torch.sqrt(rv.double() + 1e-5)
        assert_slices_close(out, lambda x: torch.relu((x - column(rm.double())) * column(scale)
                                                      + column(b.double())), (x,), tol)
        return

    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    mean, var = channel_stats(x)
    scale = w.double() / torch.sqrt(var + 1e-5)
    count = numel // C

    def bn(x):
        return (x - column(mean)) * column(scale) + column(b.double())

    if op == "batch_norm_add_relu_train":
        z = data(-means, spread)
        out = FF.batch_norm_add_relu(x, z, rm, rv, w, b, training=True)
        assert_slices_close(out, lambda x, z: torch.relu(bn(x) + z), (x, z), tol)
    else:
        w.requires_grad_()
        b.requires_grad_()
        x.requires_grad_()
        out = FF.batch_norm_relu(x, rm, rv, w, b, training=True)
        assert_slices_close(out.detach(), lambda x: torch.relu(bn(x)), (x.detach(),), tol)
        grad_out = data(torch.zeros(C, device="cuda"), torch.ones(C, device="cuda"))
        out.backward(grad_out)
        xd = x.detach()
        del out  # the ReLU mask is taken from the float64 pre-activation below
        invstd = 1 / torch.sqrt(var + 1e-5)
        sums = torch.zeros(4, C, dtype=torch.float64, device="cuda")
        for i in slices(shape):
            xhat = (xd[i].double() - column(mean)) * column(invstd)
            gm = grad_out[i].double() * (bn(xd[i].double()) > 0)
            sums += torch.stack([gm.sum((0, 2, 3)), (gm * xhat).sum((0, 2, 3)),
                                 gm.abs().sum((0, 2, 3)), (gm * xhat).abs().sum((0, 2, 3))])
        sum_g, sum_gx, abs_g, abs_gx = sums
        # float32 sums of 3e7 terms: within 1e-4 of the sum of their magnitudes
        assert ((b.grad.double() - sum_g).abs() <= 1e-4 * abs_g).all()
        assert ((w.grad.double() - sum_gx).abs() <= 1e-4 * abs_gx).all()
        k = column(w.detach().double() * invstd)

        def grad_input(x, dy):
            xhat = (x - column(mean)) * column(invstd)
            gm = dy * (bn(x) > 0)
            return k * (gm - column(sum_g / count) - xhat * column(sum_gx / count))

        assert_slices_close(x.grad, grad_input, (xd, grad_out), 2e-2)
    unbiased = var * count / (count - 1)
    assert rel_err(rm, 0.1 * mean) <= 1e-4
    assert rel_err(rv, 0.9 + 0.1 * unbiased) <= 1e-4


# ---- peak memory of a training step (GPU) ---------------------------------------------------


def training_step_peak(model, x, labels):
    """torch.cuda.max_memory_allocated over one bf16-autocast SGD step, after a warm-up step
    (optimizer state, cuDNN plans, Triton autotuning)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_resnet50_training_peak_memory_at_most_torchvision(backend, cuda_memory):
    """fusedres ResNet-50 (N=64, 224x224, channels_last, bf16 autocast) needs no more memory
    for a training step than torchvision eager: one model on the GPU at a time."""
    import torchvision  # a dependency of fusedres
    use((backend, "cuda"))
    x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    peaks = {}
    for name in ("torchvision", "fusedres"):
        torch.manual_seed(0)
        model = torchvision.models.resnet50() if name == "torchvision" else fusedres.ResNet50()
        model = model.cuda().to(memory_format=torch.channels_last).train()
        peaks[name] = training_step_peak(model, x, labels)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    message = (f"ResNet-50 training step peak memory ({backend}): fusedres "
               f"{peaks['fusedres'] / 2**20:.0f} MiB, torchvision eager "
               f"{peaks['torchvision'] / 2**20:.0f} MiB")
    print(message)
    assert peaks["fusedres"] <= peaks["torchvision"], message
