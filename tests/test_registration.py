"""The ops as torch.library sees them: schemas + fake kernels + autograd (opcheck), fp64
gradcheck of every differentiable op, and torch.compile(fullgraph=True) over the functions."""
import pytest
import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF
from conftest import CONV_TOLERANCE, TARGETS, TOLERANCE, assert_close, make, use

CONV_OPS = {"conv_bias_relu", "conv_bias_add_relu", "fold_conv_bn"}  # C++ namespace only
TRITON_ONLY = {"fused_conv2d"}  # the Triton convolution: float16 / bfloat16 / float32


def namespace(backend):
    return fusedres._backend.op_library(backend)


def per_channel(C, device, dtype=torch.float64, positive=False, requires_grad=False):
    t = torch.rand(C, dtype=dtype) + 0.5 if positive else torch.randn(C, dtype=dtype)
    return t.to(device).requires_grad_(requires_grad)


def sample_calls(target, dtype=torch.float64, layout="nchw", requires_grad=True,
                 shape=(3, 4, 3, 5)):
    """(op, args) for every op of target's backend, with small inputs of 4 channels."""
    backend, device = target
    ops = namespace(backend)
    return [(getattr(ops, name), args)
            for name, args in _sample_args(device, dtype, layout, requires_grad, shape)
            if (name not in CONV_OPS or backend != "triton")
            and (name not in TRITON_ONLY or (backend == "triton" and dtype != torch.float64))]


def _sample_args(device, dtype, layout, requires_grad, shape):
    """(op name, args) pairs."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def x():
        return make(shape, dtype, device, layout, requires_grad=requires_grad)

    def vec(positive=False):
        return per_channel(4, device, acc, positive, requires_grad)

    def running():  # running_mean, running_var, num_batches_tracked
        return (per_channel(4, device, acc), per_channel(4, device, acc, positive=True),
                torch.tensor(2, device=device))

    out = x().detach()
    mean, invstd = per_channel(4, device, acc), per_channel(4, device, acc, positive=True)
    conv_w = make((6, 4, 3, 3), dtype, device, requires_grad=requires_grad)
    strided_out = F.conv2d(x().detach(), conv_w.detach(), None, 2, 1).shape
    return [
        ("batch_norm_stats", (x().detach(),)),
        ("batch_norm_apply", (x(), vec(), vec(True), vec(), None, None, None, None, True)),
        ("batch_norm_apply", (x(), vec(), vec(True), None, x(), None, None, None, False)),
        ("batch_norm_apply", (x(), vec(), vec(True), vec(), x(), vec(), vec(True), vec(), True)),
        ("batch_norm_coefficients", (x().detach(), vec(), vec(True), vec(True), vec(), 1e-5)),
        ("batch_norm_coefficients", (x().detach(), vec(), vec(True), None, None, 1e-3)),
        # a bfloat16 model's buffers, a half weight: read in their own dtypes
        ("batch_norm_coefficients", (x().detach(), per_channel(4, device, torch.bfloat16),
                                     per_channel(4, device, torch.bfloat16, positive=True),
                                     per_channel(4, device, torch.float16, True, requires_grad),
                                     None, 1e-5)),
        ("batch_norm_act_train", (x(), vec(True), vec(), None, 1e-5, True)),
        ("batch_norm_act_train", (x(), None, None, x(), 1e-3, True)),
        ("batch_norm_act_train", (x(), vec(True), vec(), None, 1e-5, False)),
        ("dual_batch_norm_act_train", (x(), vec(True), vec(), x(), vec(True), vec(), 1e-5, 1e-4, True)),
        # the running statistics, updated in place (momentum, or None: the cumulative average)
        ("batch_norm_act_train", (x(), vec(True), vec(), None, 1e-5, True, *running(), 0.1)),
        ("dual_batch_norm_act_train", (x(), vec(True), vec(), x(), vec(True), vec(), 1e-5, 1e-4,
                                       True, *running(), None, *running()[:2], None, 0.3)),
        ("add_batch_norm_stats", (x().detach(), x().detach())),
        ("add_batch_norm_act_train", (x(), x(), vec(True), vec(), 1e-5, True)),
        ("add_batch_norm_act_train", (x(), x(), None, None, 1e-3, False)),
        ("add_batch_norm_act_train", (x(), x(), None, None, 1e-3, False, *running(), None)),
        ("batch_norm_backward_reduce", (x().detach(), out, x().detach(), mean, invstd)),
        ("batch_norm_backward_reduce", (x().detach(), out, x().detach(), mean, invstd, True)),
        ("batch_norm_backward_reduce", (x().detach(), None, x().detach(), mean, invstd, False,
                                        vec(True).detach(), vec().detach())),
        # the parameters' gradients in another dtype (float64: exact against the reference)
        ("batch_norm_backward_reduce", (x().detach(), out, x().detach(), mean, invstd, True,
                                        None, None, torch.float64)),
        ("batch_norm_backward_input", (x().detach(), None, x().detach(), mean, invstd,
                                         vec().detach(), mean, invstd, vec(True).detach(), None)),
        ("batch_norm_backward_input", (x().detach(), None, x().detach(), mean, invstd,
                                         vec().detach(), mean, invstd)),
        ("batch_norm_backward_input", (x().detach(), None, x().detach(), mean, invstd, None,
                                         mean, invstd, vec(True).detach(), vec().detach(),
                                         x().detach())),
        ("dual_batch_norm_backward", (x().detach(), out, x().detach(), mean, invstd,
                                       vec().detach(), x().detach(), vec().detach(),
                                       vec(True).detach(), vec(True).detach())),
        # no ReLU, no weights; the parameters' gradients in another dtype (float64: exact)
        ("dual_batch_norm_backward", (x().detach(), None, x().detach(), mean, invstd, None,
                                       x().detach(), mean, invstd, None, torch.float64,
                                       torch.float64)),
        ("add_relu", (x(), x())),
        ("conv_bias_relu", (x(), conv_w, per_channel(6, device, dtype, requires_grad=requires_grad),
                              [1, 1], [1, 1], [1, 1], 1)),
        ("conv_bias_add_relu", (x(), conv_w, None, make(strided_out, dtype, device, layout,
                                                        requires_grad=requires_grad),
                                  [2, 2], [1, 1], [1, 1], 1)),
        ("fused_conv2d", (x(), conv_w, per_channel(6, device, acc, requires_grad=requires_grad), None,
                    vec(True), vec(), [1, 1], [1, 1], [1, 1], 1, True, True, True)),
        ("fused_conv2d", (x(), conv_w, None, make(strided_out, dtype, device, layout,
                                            requires_grad=requires_grad),
                    None, None, [2, 2], [1, 1], [1, 1], 1, False, True, False)),
        ("fold_conv_bn", (conv_w, None, per_channel(6, device, acc), per_channel(6, device, acc, True),
                            1e-5, per_channel(6, device, acc, True, requires_grad),
                            per_channel(6, device, acc, requires_grad=requires_grad))),
    ]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(target, layout, dtype):
    use(target)
    for op, args in sample_calls(target, dtype, layout):
        # fold_conv_bn is CompositeImplicitAutograd: ATen's own autograd and meta kernels apply.
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_op_numbers(target, layout, dtype):
    """Every raw op of the target's namespace, called directly, against its reference
    (fusedres/reference.py, same name and arguments) evaluated in float64; the buffers an op
    updates in place (running statistics) too."""
    use(target)
    checked = set()
    for op, args in sample_calls(target, dtype, layout, requires_grad=False):
        name = op._qualified_op_name.split("::")[1]
        ref_args = [(a.double() if a.is_floating_point() else a.clone())
                    if isinstance(a, torch.Tensor) else a for a in args]
        got = op(*args)
        ref = getattr(fusedres.reference, name)(*ref_args)
        for i, a in enumerate(op.default._schema.arguments[:len(args)]):
            if a.alias_info is not None and a.alias_info.is_write and args[i] is not None:
                if args[i].is_floating_point():
                    assert_close(args[i], ref_args[i], dtype, TOLERANCE)
                else:
                    assert torch.equal(args[i], ref_args[i]), (name, a.name)
        got = got if isinstance(got, tuple) else (got,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert len(got) == len(ref), name
        tolerance = CONV_TOLERANCE if "conv" in name else TOLERANCE
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape, (name, i)
            try:
                assert_close(g, r, dtype, tolerance)
            except AssertionError as e:
                raise AssertionError(f"{name} output {i}: {e}") from None
        checked.add(name)
    from fusedres._ops import NAMESPACE_OPS
    backend = target[0]
    expected = set(NAMESPACE_OPS[namespace(backend).name]) - ({"fused_conv2d"} if dtype == torch.float64
                                                               else set())
    assert expected <= checked, expected - checked


@pytest.mark.parametrize("target", TARGETS)
def test_gradcheck_fp64(target):
    use(target)
    differentiable = {"batch_norm_apply", "batch_norm_coefficients", "batch_norm_act_train",
                      "dual_batch_norm_act_train", "add_batch_norm_act_train", "add_relu"}
    if target[0] != "triton":
        differentiable |= CONV_OPS
    checked = set()
    # Few elements: gradcheck evaluates every op twice per input element.
    for op, args in sample_calls(target, torch.float64, shape=(2, 4, 2, 3)):
        name = op._qualified_op_name.split("::")[1]
        if name not in differentiable or any(  # (a half-precision argument: opcheck's only)
                isinstance(a, torch.Tensor) and a.requires_grad and a.dtype != torch.float64
                for a in args):
            continue

        def first_output(*a, op=op, name=name):
            out = op(*a)
            if name == "add_batch_norm_act_train":
                return out[:2]  # the output and the sum (the input's gradient sums both)
            if name == "batch_norm_coefficients":
                return out  # mean, scale, shift: each from its own inputs
            return out[0] if isinstance(out, tuple) else out

        assert torch.autograd.gradcheck(first_output, args, eps=1e-6, atol=1e-5, rtol=1e-4), name
        checked.add(name)
    assert checked == differentiable


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph(target, training):
    """The functional API traces without graph breaks, running stats and autograd included."""
    device = use(target)
    torch._dynamo.reset()
    C = 4

    def block(x, z, rm, rv, w, b, nbt, conv_w):
        y = FF.batch_norm_relu(x, rm, rv, w, b, training, 0.1, 1e-5, num_batches_tracked=nbt)
        y = FF.batch_norm_add_relu(y, z, rm, rv, w, b, training, None, 1e-5,
                                   num_batches_tracked=nbt)
        y = FF.dual_batch_norm_add_relu(y, z, rm, rv, rm, rv, w, b, w, b, training)
        y = FF.add_relu(y, z)
        z, y = FF.add_batch_norm_relu(y, z, rm, rv, w, b, training, 0.1, 1e-5,
                                      num_batches_tracked=nbt)
        y = y + z
        y = FF.fused_conv2d(y, conv_w, None, 1, 1, input_scale=w, input_shift=b, relu=True)
        return FF.conv_bias_relu(y, conv_w, b, 1, 1)

    def inputs():
        x = make((2, C, 5, 5), torch.float32, device, requires_grad=True)
        z = make((2, C, 5, 5), torch.float32, device)
        rm = torch.zeros(C, device=device)
        rv = torch.ones(C, device=device)
        w = (torch.rand(C, device=device) + 0.5).requires_grad_()
        b = torch.randn(C, device=device).requires_grad_()
        nbt = torch.tensor(0, device=device)
        conv_w = make((C, C, 3, 3), torch.float32, device, scale=0.3)
        return [x, z, rm, rv, w, b, nbt, conv_w]

    eager_in = inputs()
    compiled_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager_in]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for step in range(2):
        out = block(*eager_in)
        out_c = compiled(*compiled_in)
        assert_close(out_c, out, torch.float32)
        out.sum().backward()
        out_c.sum().backward()
    for a, b in zip(eager_in, compiled_in):
        if a.requires_grad:
            assert_close(b.grad, a.grad, torch.float32)
        else:
            assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)  # running stats


@pytest.mark.parametrize("target", TARGETS)
def test_compile_inductor(target):
    """The same under the default Inductor backend, for the training BN + ReLU."""
    device = use(target)
    torch._dynamo.reset()
    x = make((4, 8, 6, 6), torch.float32, device, "channels_last")
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    rm_c, rv_c = rm.clone(), rv.clone()
    fn = torch.compile(FF.batch_norm_relu, fullgraph=True)
    out = fn(x, rm_c, rv_c, None, None, True)
    ref = FF.batch_norm_relu(x, rm, rv, None, None, True)
    assert_close(out, ref, torch.float32)
    assert_close(rm_c, rm, torch.float32)
    assert_close(rv_c, rv, torch.float32)
    assert_close(out, torch.relu(F.batch_norm(x.double(), None, None, training=True)), torch.float32)


def test_cuda_kernels_are_registered_when_built():
    """CI has no GPU: this is where it checks that the compiled CUDA kernels did register."""
    info = fusedres.info()
    if not info["built"]["cuda"]:
        pytest.skip("built without CUDA kernels")
    assert info["loaded"]["cuda"], info["errors"]["cuda"]
    for name in ["batch_norm_stats", "batch_norm_apply", "batch_norm_backward_reduce",
                 "batch_norm_backward_input", "add_relu", "conv_bias_relu", "conv_bias_add_relu"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres::{name}", "CUDA"), name
