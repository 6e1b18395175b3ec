"""GPU cost counting without a GPU (fusedres._cost): the kernel launches of the fused ops and the
global-memory bytes each kernel moves, counted in the CUDA emulation and in the Triton
interpreter, plus the ATen ops of the ops' glue. Here: the counts equal the bytes worked out by
hand for simple kernels on both targets (masked-off Triton elements excluded), strict counting
shows that no CUDA kernel touches a tensor without the counted helpers, nothing is recorded
outside a count, counts repeat exactly, and gpu_geometry sizes the grids of a bigger GPU."""
import math
import sys

import pytest
import torch
import triton

import fusedres.functional as FF
from conftest import make, use
from fusedres import _cost

EMULATED = ("cuda-emulated", "cpu")
TRITON = ("triton", "cpu")
BOTH = [pytest.param(EMULATED, id="cuda-emulated", marks=pytest.mark.emulated),
        pytest.param(TRITON, id="triton-interpreter", marks=pytest.mark.triton)]


def ops(target):
    return torch.ops.fusedres_emulated if target == EMULATED else torch.ops.fusedres_triton


def channel_vectors(C, n):
    return [torch.rand(C) + 0.5 for _ in range(n)]


def apply_op(target, x, vectors, residual=None):
    """batch_norm_apply + ReLU with vectors = (mean, scale, shift), float32."""
    return ops(target).batch_norm_apply(x, *vectors, residual, None, None, None, True)


@pytest.mark.parametrize("target", BOTH)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("residual", [False, True])
def test_apply_bytes_are_exact(target, layout, residual):
    """The normalize kernel reads x (and the residual) once and its three per-channel vectors,
    and writes y once: one launch, exactly those bytes, in bfloat16 and float32 (C = 40: the
    Triton tiles of the last channel block are partly masked off, which moves nothing)."""
    use(target)
    for dtype in (torch.bfloat16, torch.float32):
        x = make((3, 40, 5, 7), dtype, "cpu", layout)
        r = make((3, 40, 5, 7), dtype, "cpu", layout) if residual else None
        vectors = channel_vectors(40, 3)
        with _cost.count(strict=target == EMULATED) as c:
            y = apply_op(target, x, vectors, r)
        tensor = x.numel() * x.element_size()
        (launch,) = c.launches
        assert launch.kernel.startswith("normalize_channels" if target == EMULATED
                                        else "_normalize_kernel")
        assert launch.read_bytes == tensor * (2 if residual else 1) + 3 * 40 * 4
        assert launch.write_bytes == tensor == y.numel() * y.element_size()
        assert launch.write_requests == tensor  # each output element stored once
        assert c.aten == []  # no glue: the op is one kernel
        assert c.total_launches == 1
        if target == TRITON:  # per tensor argument: x (and r) read once, y written once
            touched = {t["names"][0]: (t["read_bytes"], t["write_bytes"])
                       for t in launch.tensors}
            assert touched["x_ptr"] == (tensor, 0) and touched["y_ptr"] == (0, tensor)
            assert touched["mean_ptr"] == (40 * 4, 0)
            if residual:
                assert touched["r_ptr"] == (tensor, 0)


@pytest.mark.parametrize("target", BOTH)
def test_add_bn_relu_moves_its_floor(target):
    """add_batch_norm_relu in training: the forward reads input and residual once (writing
    the sum as it takes its statistics) and the sum once more (writing the output): 5 passes;
    the backward, with a gradient for both outputs, reads grad and the sum (reduce), then
    grad, the sum and the sum's own gradient, writing the input's gradient: 6 passes. Within
    2% in bytes (per-channel vectors and glue) besides the partials the merges combine, in 3
    kernels each (statistics, merge, normalize; reduce, merge, input gradient)."""
    use(target)
    x = make((8, 64, 8, 8), torch.bfloat16, "cpu", "channels_last", requires_grad=True)
    z = make((8, 64, 8, 8), torch.bfloat16, "cpu", "channels_last", requires_grad=True)
    rm, rv, w, b = torch.zeros(64), torch.ones(64), *channel_vectors(64, 2)
    w.requires_grad_()
    b.requires_grad_()
    grads = [make((8, 64, 8, 8), torch.bfloat16, "cpu", "channels_last") for _ in range(2)]
    tensor = x.numel() * x.element_size()
    with _cost.count(strict=target == EMULATED) as forward:
        total, out = FF.add_batch_norm_relu(x, z, rm, rv, w, b, True)
    with _cost.count(strict=target == EMULATED) as backward:
        torch.autograd.grad((out, total), (x, z, w, b), grads)
    for c, passes in ((forward, 5), (backward, 6)):
        moved = c.read_bytes + c.write_bytes  # (the glue's too: an unfused add would show)
        # The partials of the statistics / sums: written by the first kernel, read by the merge
        # (which also reads and writes per-channel vectors: the running statistics, ...).
        partials = sum(2 * launch.read_bytes + launch.write_bytes for launch in c.launches
                       if "merge" in launch.kernel)
        assert passes * tensor * 0.98 <= moved - partials <= passes * tensor * 1.02, (
            passes, moved / tensor, partials / tensor)
    assert len(forward.launches) == 3 and len(backward.launches) == 3  # (+ glue: c.aten)


def plane_walk(planes, inner, vec):
    """What a channels-first kernel should access of a tensor of `planes` planes of `inner`
    values, read `vec` values at a time (a 16-byte-aligned base): each aligned vector that lies
    inside a plane is one access, every other value one of its own. Returns (whole vectors,
    single values, the units the walk starts per plane: csrc/cuda/utils.cuh, PlaneUnits)."""
    whole = single = 0
    for p in range(planes):
        start, end = p * inner, (p + 1) * inner
        inside = max(0, end // vec - -(-start // vec))
        whole += inside
        single += inner - inside * vec
    per_plane = inner // vec if inner % vec == 0 else (inner + 2 * vec - 2) // vec
    return whole, single, per_plane


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hw", [(7, 7), (5, 7), (14, 14), (4, 8)])
def test_emulated_channels_first_reads_vectors(dtype, hw):
    """NCHW kernels read 16-byte vectors whatever H * W is (7x7: 49 values a plane, no multiple
    of 8): each plane's aligned vectors are one access, only its clipped ends value by value,
    and each unit of the walk reads its channel's coefficients once. Counted exactly for the
    forward's statistics and normalize kernels and the backward's input gradient."""
    use(EMULATED)
    C = 40
    x = make((3, C, *hw), dtype, "cpu", "nchw", requires_grad=True)
    inner, vec = hw[0] * hw[1], 16 // x.element_size()
    whole, single, per_plane = plane_walk(3 * C, inner, vec)
    accesses = whole + single
    if inner % vec != 0:  # the point: far fewer accesses than values
        assert accesses < x.numel() / 2
    vectors = channel_vectors(C, 3)
    with _cost.count(strict=True) as c:
        apply_op(EMULATED, x.detach(), vectors)
    (launch,) = c.launches
    assert launch.kernel == "normalize_channels_first_kernel"
    assert launch.read_accesses == accesses + 3 * 3 * C * per_plane
    assert launch.write_accesses == accesses
    assert launch.read_requests == x.numel() * x.element_size() + 3 * 4 * 3 * C * per_plane
    assert launch.read_bytes == x.numel() * x.element_size() + 3 * C * 4
    if dtype == torch.bfloat16:  # by size: x and y's vectors and values, the float coefficients
        assert launch.accesses_by_size == {1: 0, 2: 2 * single, 4: 3 * 3 * C * per_plane, 8: 0,
                                           16: 2 * whole}

    rm, rv, w, b = torch.zeros(C), torch.ones(C), *channel_vectors(C, 2)
    with _cost.count(strict=True) as forward:
        y = FF.batch_norm_relu(x, rm, rv, w, b, True)
    with _cost.count(strict=True) as backward:
        torch.autograd.grad(y, x, torch.randn_like(y))
    kernels = {launch.kernel: launch for launch in forward.launches + backward.launches}
    stats = kernels["stats_channels_first_kernel"]
    assert stats.read_accesses == accesses  # x, nothing else
    assert kernels["input_grad_channels_first_kernel"].write_accesses == accesses


@pytest.mark.emulated
def test_emulated_stats_bytes_are_exact():
    """batch_norm_stats: the partial kernel reads x once and writes 3 doubles per channel and
    block; the merge reads those and writes mean and var."""
    use(EMULATED)
    x = make((4, 64, 26, 22), torch.bfloat16, "cpu", "channels_last")
    with _cost.count(strict=True) as c:
        torch.ops.fusedres_emulated.batch_norm_stats(x)
    partial, merge = c.launches
    assert (partial.kernel, merge.kernel) == ("stats_channels_last_kernel",
                                              "merge_partials_kernel")
    blocks = partial.grid[1]
    assert blocks > 1
    assert partial.read_bytes == partial.read_requests == x.numel() * 2
    assert partial.write_bytes == 3 * blocks * 64 * 8
    assert merge.read_bytes == 3 * blocks * 64 * 8
    assert merge.write_bytes == 2 * 64 * 4


@pytest.mark.triton
def test_triton_stats_partial_reads_the_input_once():
    """The Triton statistics' partial kernel reads each value of x once (its shift, each
    channel's first value, is one of them) and writes 3 floats per channel and program."""
    use(TRITON)
    x = make((4, 40, 13, 11), torch.float32, "cpu", "channels_last")
    with _cost.count() as c:
        torch.ops.fusedres_triton.batch_norm_stats(x)
    partial = c.launches[0]
    assert partial.kernel == "_stats_partial_kernel"
    assert partial.read_bytes == x.numel() * 4
    assert partial.write_bytes == 3 * partial.grid[1] * 40 * 4


@pytest.mark.emulated
def test_strict_counting_covers_every_kernel():
    """Every kernel of csrc/cuda, launched once under strict counting: each of its tensors is
    inaccessible but for the access a counted helper announces, so an access that bypasses the
    helpers (a plain x[i]) would fail the launch. None does: the counts miss nothing."""
    from test_cuda_emulation import every_op_once, kernels_in_sources

    use(EMULATED)
    with _cost.count(strict=True) as c:
        every_op_once()
    assert kernels_in_sources() <= {launch.kernel for launch in c.launches}
    assert all(launch.read_bytes > 0 and launch.write_bytes > 0 for launch in c.launches)


@pytest.mark.emulated
def test_strict_counting_catches_an_uncounted_access():
    """A test-only kernel reads its input with a plain dereference: plain counting misses the
    read (only the writes show), strict counting fails the launch and names the kernel."""
    use(EMULATED)
    x = torch.randn(100)
    with _cost.count() as c:
        out = torch.ops.fusedres_emulated.uncounted_read(x)
    assert torch.equal(out, x)
    (launch,) = c.launches
    assert (launch.read_bytes, launch.write_bytes) == (0, 400)
    with pytest.raises(RuntimeError, match=r"uncounted global-memory access .* in kernel "
                                           r"uncounted_read_kernel, block \(0, 0, 0\)"):
        with _cost.count(strict=True):
            torch.ops.fusedres_emulated.uncounted_read(x)
    # The tensors are accessible again, and an out-of-bounds read is still reported as one.
    assert torch.equal(x + 0, x)
    with pytest.raises(RuntimeError, match="out-of-bounds access .* read_past_end_kernel"):
        with _cost.count(strict=True):
            torch.ops.fusedres_emulated.read_past_end(x)


@pytest.mark.parametrize("target", BOTH)
def test_nothing_is_recorded_outside_a_count(target):
    """Ops run outside a count leave no trace in the next one, and a count leaves no hook
    behind (the emulation's flag off, no Triton counter, the interpreter unpatched)."""
    use(target)
    x = make((2, 16, 4, 4), torch.float32, "cpu", "channels_last")
    vectors = channel_vectors(16, 3)
    apply_op(target, x, vectors)
    with _cost.count() as c:
        pass
    apply_op(target, x, vectors)
    assert c.launches == [] and c.aten == []
    from fusedres.kernels import _common
    from triton.runtime import interpreter

    assert _common.cost_counter is None
    assert "create_masked_load" not in vars(interpreter.interpreter_builder)
    if target == EMULATED:
        emulation = sys.modules["fusedres._C_emulated"]
        emulation.cost_start(False)
        assert emulation.cost_stop() == []  # the ops run outside were not recorded
    with pytest.raises(RuntimeError, match="does not nest"):
        with _cost.count(), _cost.count():
            pass


@pytest.mark.parametrize("target", BOTH)
def test_counts_repeat_exactly(target):
    """A training forward and backward counted twice: the same launches, grids and bytes, and
    the same ATen ops."""
    use(target)
    x = make((2, 16, 6, 5), torch.float32, "cpu", "channels_last", requires_grad=True)
    z = make((2, 16, 6, 5), torch.float32, "cpu", "channels_last", requires_grad=True)
    w = torch.rand(16, requires_grad=True)
    g = make((2, 16, 6, 5), torch.float32, "cpu", "channels_last")

    def once():
        with _cost.count() as c:
            out = FF.batch_norm_add_relu(x, z, torch.zeros(16), torch.ones(16), w, None,
                                         training=True)
            torch.autograd.grad(out, [x, z, w], g)
        return ([(launch.kernel, launch.grid, launch.read_bytes, launch.write_bytes,
                  launch.read_requests, launch.write_requests) for launch in c.launches],
                [(op.name, op.shapes, op.read_bytes, op.write_bytes) for op in c.aten])

    first = once()
    assert first[0] and first[1]
    assert once() == first


@pytest.mark.parametrize("target", BOTH)
def test_dual_bn_relu_moves_its_floor(target):
    """dual_batch_norm_add_relu (a projection shortcut's relu(bn(x) + bn_r(z))) in training:
    the forward reads x and z for both BNs' statistics in one kernel, then both again and
    writes the output: 5 passes; the backward reads the gradient, the output, x and z for both
    BNs' sums in one kernel, then all four again and writes both input gradients: 10 passes.
    Within 2% in bytes besides the merges' partials, 3 kernels each way and no glue (the
    running statistics of both BNs are updated by the kernels)."""
    use(target)
    shape = (8, 64, 8, 8)
    x, z = (make(shape, torch.bfloat16, "cpu", "channels_last", requires_grad=True)
            for _ in range(2))
    bns = [(torch.zeros(64), torch.ones(64), *[v.requires_grad_() for v in channel_vectors(64, 2)],
            torch.tensor(0)) for _ in range(2)]
    (rm, rv, w, b, nbt), (rrm, rrv, rw, rb, rnbt) = bns
    grad = make(shape, torch.bfloat16, "cpu", "channels_last")
    tensor = x.numel() * x.element_size()
    with _cost.count(strict=target == EMULATED) as forward:
        out = FF.dual_batch_norm_add_relu(x, z, rm, rv, rrm, rrv, w, b, rw, rb, True,
                                          num_batches_tracked=nbt,
                                          residual_num_batches_tracked=rnbt)
    with _cost.count(strict=target == EMULATED) as backward:
        torch.autograd.grad(out, (x, z, w, b, rw, rb), grad)
    assert nbt.item() == rnbt.item() == 1
    for c, passes in ((forward, 5), (backward, 10)):
        moved = c.read_bytes + c.write_bytes
        partials = sum(2 * launch.read_bytes + launch.write_bytes for launch in c.launches
                       if "merge" in launch.kernel)
        assert passes * tensor * 0.98 <= moved - partials <= passes * tensor * 1.02, (
            passes, moved / tensor, partials / tensor)
        assert len(c.launches) == 3 and c.aten == [], (c.kernels(), c.aten)


@pytest.mark.emulated
@pytest.mark.parametrize("form", ["relu", "add", "dual"])
def test_cuda_partials_stay_small_with_few_rows(form):
    """The CUDA reductions' blocks each reduce enough rows that their partials (written, then
    read by the merge) stay a small share of the bytes, also where a tensor has few rows for
    the GPU's 1,056 blocks (14x14: 1,568 rows at N = 8; sized to fill the GPU alone, the
    statistics' partials, written and read again, came to three quarters of x's size, 25%
    over the forward's floor): every op within 3% of its floor, partials and all, under an
    H100's geometry. Narrower blocks (fewer channels each) keep more of them: 4 block columns
    across 64 channels."""
    use(EMULATED)
    shape = (8, 64, 14, 14)
    x, z = (make(shape, torch.bfloat16, "cpu", "channels_last", requires_grad=True)
            for _ in range(2))
    bn = [torch.zeros(64), torch.ones(64), *[v.requires_grad_() for v in channel_vectors(64, 2)]]
    rbn = [torch.zeros(64), torch.ones(64), *[v.requires_grad_() for v in channel_vectors(64, 2)]]
    grad = make(shape, torch.bfloat16, "cpu", "channels_last")
    tensor = x.numel() * x.element_size()
    with _cost.gpu_geometry(132):
        with _cost.count() as forward:
            if form == "relu":
                out = FF.batch_norm_relu(x, *bn[:2], *bn[2:], training=True)
            elif form == "add":
                out = FF.batch_norm_add_relu(x, z, *bn[:2], *bn[2:], training=True)
            else:
                out = FF.dual_batch_norm_add_relu(x, z, *bn[:2], *rbn[:2], *bn[2:], *rbn[2:],
                                                  True)
        with _cost.count() as backward:
            torch.autograd.grad(out, (x, z) if form != "relu" else (x,), grad)
    floors = {"relu": (3, 5), "add": (4, 7), "dual": (5, 10)}[form]
    for c, passes in zip((forward, backward), floors):
        moved = c.read_bytes + c.write_bytes
        assert passes * tensor <= moved <= passes * tensor * 1.03, (passes, moved / tensor)
    stats = forward.launches[0]  # (2 or 6 block rows: 768 or 256 rows each)
    assert stats.kernel == "stats_channels_last_kernel" and stats.grid[0] == 4


@pytest.mark.parametrize("target", BOTH)
def test_eval_bn_is_a_kernel_per_bn_and_the_normalize(target):
    """An eval BN + ReLU (+ residual, + the shortcut's BN): one kernel computes each BN's
    mean, scale and shift from its running statistics and parameters (a bfloat16 model's,
    read in their dtype), one normalizes: no per-channel ATen ops between them, and only
    per-channel bytes besides the normalize's two or three passes."""
    use(target)
    shape = (2, 16, 4, 4)
    x, z = (make(shape, torch.bfloat16, "cpu", "channels_last") for _ in range(2))
    bns = [[torch.randn(16).bfloat16(), torch.rand(16).bfloat16() + 0.5,
            *[v.bfloat16() for v in channel_vectors(16, 2)]] for _ in range(2)]
    (rm, rv, w, b), (rrm, rrv, rw, rb) = bns
    tensor = x.numel() * x.element_size()
    with torch.no_grad():
        for form, passes in (("relu", 2), ("add", 3), ("dual", 3)):
            with _cost.count() as c:
                if form == "relu":
                    FF.batch_norm_relu(x, rm, rv, w, b)
                elif form == "add":
                    FF.batch_norm_add_relu(x, z, rm, rv, w, b)
                else:
                    FF.dual_batch_norm_add_relu(x, z, rm, rv, rrm, rrv, w, b, rw, rb)
            bns_used = 2 if form == "dual" else 1
            coefficients = ("coefficients_kernel" if target == EMULATED
                            else "_coefficients_kernel")
            assert c.kernels() == [coefficients] * bns_used + [
                "normalize_channels_last_kernel" if target == EMULATED else "_normalize_kernel"]
            assert c.aten == [] and c.total_launches == bns_used + 1, c.aten
            per_channel = 16 * (2 * 4 + 3 * 4)  # (four bfloat16 vectors in, three float out)
            normalize = c.launches[-1]
            assert normalize.read_bytes + normalize.write_bytes == passes * tensor + 3 * 16 * 4 * (
                bns_used)
            for launch in c.launches[:-1]:
                assert launch.read_bytes + launch.write_bytes == per_channel


@pytest.mark.triton
def test_conv_prologue_backward_is_kernels():
    """fused_conv2d's backward with a BN + ReLU prologue: the prologue's output is recomputed
    by the normalize kernel and its gradients come from the BN backward's reduce (mask
    recomputed from x) and one more normalize pass; besides the convolution's own backward and
    its output ReLU's, no ATen op touches a tensor of x's size (there were 8-10 float32 passes
    of torch ops)."""
    use(TRITON)
    x = make((2, 8, 10, 10), torch.float32, "cpu", "channels_last", requires_grad=True)
    w = make((8, 8, 3, 3), torch.float32, "cpu", "channels_last", requires_grad=True)
    scale, shift = (v.requires_grad_() for v in channel_vectors(8, 2))
    out = FF.fused_conv2d(x, w, None, 1, 1, input_scale=scale, input_shift=shift, relu=True)
    grad = torch.ones_like(out)
    with _cost.count() as c:
        torch.autograd.grad(out, (x, w, scale, shift), grad)
    assert [launch.kernel for launch in c.launches] == [
        "_normalize_kernel", "_reduce_partial_kernel", "_reduce_merge_kernel", "_normalize_kernel"]
    big = [op.name for op in c.aten if op.name != "aten::threshold_backward" and any(
        isinstance(s, (list, tuple)) and math.prod(s) >= x.numel() for s in op.shapes)]
    assert big == [], big


@pytest.mark.parametrize("target", BOTH)
def test_glue_ops_are_listed(target):
    """The ATen ops of a training forward besides its kernels. With nn.BatchNorm2d's buffers
    there are none: the statistics kernel counts the batch and the merge updates the running
    statistics, three launches in all. With a counter the ops do not take (a float one), the
    functional API's glue: num_batches_tracked += 1 and the update of both running statistics,
    each a launch on a GPU, listed; the allocations, views and the interpreter's copies of the
    kernels' arguments are not."""
    use(target)
    x = make((2, 16, 4, 4), torch.float32, "cpu", "channels_last")
    for tracked in (torch.tensor(0), torch.tensor(0.0)):
        running_mean, running_var = torch.zeros(16), torch.ones(16)
        with _cost.count() as c:
            FF.batch_norm_relu(x, running_mean, running_var, training=True,
                               num_batches_tracked=tracked)
        names = [op.name for op in c.aten]
        assert tracked.item() == 1
        if tracked.dtype == torch.int64:
            assert names == [] and c.total_launches == 3
            continue
        assert names[0] == "aten::add_" and c.aten[0].shapes[0] == []  # the batch counter
        assert names.count("aten::_foreach_lerp_") == 1  # both running statistics, one launch
        assert all(not name.startswith(("aten::empty", "aten::view", "aten::as_strided"))
                   for name in names)
        assert c.total_launches == len(c.launches) + len(c.aten)


@pytest.mark.parametrize("target", BOTH)
def test_gpu_geometry_sizes_grids_for_more_sms(target):
    """gpu_geometry(): the reductions get the grid of a GPU with more SMs (more row blocks /
    programs, as many as the rows allow here), and the default comes back afterwards."""
    use(target)
    # (the CUDA statistics' blocks take at least 384 rows of float32: 85 blocks here)
    shape = (8, 16, 64, 64) if target == EMULATED else (8, 16, 16, 16)
    x = make(shape, torch.float32, "cpu", "channels_last")

    def row_blocks():
        with _cost.count(aten=False) as c:
            ops(target).batch_norm_stats(x)
        return c.launches[0].grid[1]

    default = row_blocks()
    with _cost.gpu_geometry(132):
        h100 = row_blocks()
    assert row_blocks() == default
    rows = x.numel() // 16
    if target == EMULATED:  # 16 channels of float32 / 4 a vector: blocks of 4 x 64 threads;
        # on an H100 at most one block per 384 rows (2 x 128 threads: more blocks across C)
        assert (default, h100) == (16, rows // 384)
    else:  # 4 programs in the interpreter; 528 on an H100, at most one per 32 rows
        assert (default, h100) == (4, triton.cdiv(rows, 32))
