"""Bad arguments sent to the raw ops directly (torch.ops.fusedres.*, fusedres_emulated.*,
fusedres_triton.*) and to their fake kernels: every namespace refuses each case before any
kernel runs, with the same error and the same words (the C++ TORCH_CHECKs of csrc/common.h and
the Python contracts of fusedres/_ops.py are written alike; this holds them to it). The
functional API's own checks come first and are covered by tests/test_bad_input.py."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedres
from conftest import HAS_TRITON, make

C = 4
F32, F64 = torch.float32, torch.float64


def x(*shape, dtype=F32):
    return make(shape or (2, C, 3, 3), dtype)


def vec(n=C, dtype=F32):
    return torch.rand(n, dtype=dtype) + 0.5


def meta_vec(n=C):
    return torch.ones(n, device="meta")


def conv_args(**change):
    """conv_bias_add_relu's arguments, 4 -> 8 channels 3x3, with `change` applied."""
    args = dict(input=x(2, C, 5, 5), weight=make((8, C, 3, 3)), bias=vec(8),
                residual=x(2, 8, 5, 5), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    args.update(change)
    return args


def conv_bias_relu(**change):
    a = conv_args(**change)
    return ("conv_bias_relu", a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
            a["dilation"], a["groups"])


def conv_bias_add_relu(**change):
    a = conv_args(**change)
    return ("conv_bias_add_relu", *a.values())


def fused_conv2d(scale=None, shift=None, **change):
    """The Triton convolution's raw op (fused_conv2d): prologue and statistics on."""
    a = conv_args(**change)
    scale = vec() if scale is None else scale
    shift = vec() if shift is None else shift
    return ("fused_conv2d", a["input"], a["weight"], a["bias"], a["residual"], scale, shift,
            a["stride"], a["padding"], a["dilation"], a["groups"], True, True, True)


def call_of(name, defaults):
    """A builder of `name`'s calls: (name, *args) from fresh good arguments, with changes."""
    def build(**change):
        args = {**defaults(), **change}
        return (name, *args.values())
    return build


apply = call_of("batch_norm_apply", lambda: dict(
    input=x(), mean=vec(), scale=vec(), shift=vec(), residual=x(), residual_mean=None,
    residual_scale=None, residual_shift=None, relu=True))
coefficients = call_of("batch_norm_coefficients", lambda: dict(
    input=x(), running_mean=vec(), running_var=vec(), weight=vec(), bias=vec(), eps=1e-5))
NO_RUNNING = dict(running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1)
train = call_of("batch_norm_act_train", lambda: dict(
    input=x(), weight=vec(), bias=vec(), residual=None, eps=1e-5, relu=True, **NO_RUNNING))
dual = call_of("dual_batch_norm_act_train", lambda: dict(
    input=x(), weight=vec(), bias=vec(), residual=x(), residual_weight=vec(), residual_bias=vec(),
    eps=1e-5, residual_eps=1e-3, relu=True, **NO_RUNNING,
    **{f"residual_{k}": v for k, v in NO_RUNNING.items()}))
add_train = call_of("add_batch_norm_act_train", lambda: dict(
    input=x(), residual=x(), weight=vec(), bias=vec(), eps=1e-5, relu=True, **NO_RUNNING))


def counter(shape=(), dtype=torch.int64, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)
reduce = call_of("batch_norm_backward_reduce", lambda: dict(
    grad_out=x(), output=x(), input=x(), mean=vec(), invstd=vec(), write_grad=False, scale=None,
    shift=None, grad_dtype=None))
grad_input = call_of("batch_norm_backward_input", lambda: dict(
    grad_out=x(), output=x(), input=x(), mean=vec(), invstd=vec(), weight=vec(), sum_dy=vec(),
    sum_dy_xhat=vec(), scale=None, shift=None, extra_grad=None))

dual_backward = call_of("dual_batch_norm_backward", lambda: dict(
    grad_out=x(), output=x(), input=x(), mean=vec(), invstd=vec(), weight=vec(), residual=x(),
    residual_mean=vec(), residual_invstd=vec(), residual_weight=vec(), grad_dtype=None,
    residual_grad_dtype=None))


# (id, call, the error's first line); each call is (op name, *args).
CASES = [
    ("stats-1d", ("batch_norm_stats", torch.randn(5)),
     "fusedres: input must have shape (N, C, ...), got 1 dimension(s)"),
    ("stats-int", ("batch_norm_stats", torch.ones(2, C, dtype=torch.int64)),
     "fusedres: input must be a floating point tensor, got Long"),
    ("apply-mean-length", apply(mean=vec(3)), "fusedres: mean must have shape (4,), got [3]"),
    ("apply-mean-dtype", apply(mean=vec(dtype=F64)), "fusedres: mean must be Float, got Double"),
    ("apply-scale-2d", apply(scale=torch.ones(1, C)),
     "fusedres: scale must have shape (4,), got [1, 4]"),
    ("apply-shift-device", apply(shift=meta_vec()),
     "fusedres: shift is on meta but input is on cpu"),
    ("apply-residual-shape", apply(residual=x(2, C, 3, 4)),
     "fusedres: residual must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 4]"),
    ("apply-residual-dtype", apply(residual=x(dtype=F64)),
     "fusedres: residual must have the dtype of input (Float), got Double"),
    ("apply-residual-mean-alone", apply(residual=None, residual_mean=vec()),
     "fusedres: residual_mean / residual_scale / residual_shift given without a residual"),
    ("apply-residual-scale-length", apply(residual_scale=vec(5)),
     "fusedres: residual_scale must have shape (4,), got [5]"),
    ("coefficients-input-1d", coefficients(input=torch.randn(5)),
     "fusedres: input must have shape (N, C, ...), got 1 dimension(s)"),
    ("coefficients-mean-length", coefficients(running_mean=vec(3)),
     "fusedres: running_mean must have shape (4,), got [3]"),
    ("coefficients-var-int", coefficients(running_var=torch.ones(C, dtype=torch.int64)),
     "fusedres: running_var must be a floating point tensor, got Long"),
    ("coefficients-weight-device", coefficients(weight=meta_vec()),
     "fusedres: weight is on meta but input is on cpu"),
    ("coefficients-bias-2d", coefficients(bias=torch.ones(1, C)),
     "fusedres: bias must have shape (4,), got [1, 4]"),
    ("train-one-value", train(input=x(1, C, 1, 1)),
     "Expected more than 1 value per channel when training, got input size [1, 4, 1, 1]"),
    ("train-weight-length", train(weight=vec(3)), "fusedres: weight must have shape (4,), got [3]"),
    ("train-bias-int", train(bias=torch.ones(C, dtype=torch.int32)),
     "fusedres: bias must be a floating point tensor, got Int"),
    ("train-residual-shape", train(residual=x(2, C, 3, 2)),
     "fusedres: residual must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 2]"),
    ("train-int-input", train(input=torch.ones(2, C, 3, 3, dtype=torch.int64)),
     "fusedres: input must be a floating point tensor, got Long"),
    ("add-stats-residual-dtype", ("add_batch_norm_stats", x(), x(dtype=F64)),
     "fusedres: residual must have the dtype of input (Float), got Double"),
    ("add-train-one-value", add_train(input=x(1, C, 1, 1), residual=x(1, C, 1, 1)),
     "Expected more than 1 value per channel when training, got input size [1, 4, 1, 1]"),
    ("add-train-residual-shape", add_train(residual=x(2, C, 3, 2)),
     "fusedres: residual must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 2]"),
    ("input-extra-grad-dtype", grad_input(extra_grad=x(dtype=F64)),
     "fusedres: extra_grad must have the dtype of input (Float), got Double"),
    ("input-extra-grad-shape", grad_input(extra_grad=x(2, C, 3, 4)),
     "fusedres: extra_grad must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 4]"),
    ("add-train-weight-length", add_train(weight=vec(3)),
     "fusedres: weight must have shape (4,), got [3]"),
    ("dual-residual-shape", dual(residual=x(3, C, 3, 3)),
     "fusedres: residual must have the shape of input [2, 4, 3, 3], got [3, 4, 3, 3]"),
    ("dual-residual-weight", dual(residual_weight=vec(2)),
     "fusedres: residual_weight must have shape (4,), got [2]"),
    ("dual-residual-bias-device", dual(residual_bias=meta_vec()),
     "fusedres: residual_bias is on meta but input is on cpu"),
    ("train-running-var-missing", train(running_mean=vec()),
     "fusedres: running_mean and running_var must both be given or both be None"),
    ("train-running-mean-length", train(running_mean=vec(3), running_var=vec()),
     "fusedres: running_mean must have shape (4,), got [3]"),
    ("train-counter-shape", train(num_batches_tracked=counter((2,))),
     "fusedres: num_batches_tracked must have one element (a counter), got shape [2]"),
    ("train-counter-dtype", train(num_batches_tracked=counter(dtype=F32)),
     "fusedres: num_batches_tracked must be Long, got Float"),
    ("train-counter-device", train(num_batches_tracked=counter(device="meta")),
     "fusedres: num_batches_tracked is on meta but input is on cpu"),
    ("train-cumulative-without-counter", train(running_mean=vec(), running_var=vec(),
                                               momentum=None),
     "fusedres: momentum=None (a cumulative average) needs num_batches_tracked"),
    ("train-running-mean-strided", train(running_mean=vec(2 * C)[::2], running_var=vec()),
     "fusedres: running_mean must be contiguous (it is updated in place)"),
    ("train-running-var-float8", train(running_mean=vec(), running_var=vec().to(
        torch.float8_e4m3fn)),
     "fusedres: running_var must be Float, Double, Half or BFloat16, got Float8_e4m3fn"),
    ("add-train-running-var-int", add_train(running_mean=vec(),
                                            running_var=torch.ones(C, dtype=torch.int32)),
     "fusedres: running_var must be a floating point tensor, got Int"),
    ("dual-residual-counter-dtype", dual(residual_num_batches_tracked=counter(dtype=torch.int32)),
     "fusedres: residual_num_batches_tracked must be Long, got Int"),
    ("dual-residual-cumulative", dual(residual_running_mean=vec(), residual_running_var=vec(),
                                      residual_momentum=None),
     "fusedres: residual_momentum=None (a cumulative average) needs "
     "residual_num_batches_tracked"),
    ("reduce-grad-shape", reduce(grad_out=x(2, C, 3, 1)),
     "fusedres: grad_out must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 1]"),
    ("reduce-output-dtype", reduce(output=x(dtype=F64)),
     "fusedres: output must have the dtype of input (Float), got Double"),
    ("reduce-mean-length", reduce(mean=vec(8)), "fusedres: mean must have shape (4,), got [8]"),
    ("reduce-invstd-dtype", reduce(invstd=vec(dtype=F64)),
     "fusedres: invstd must be Float, got Double"),
    ("reduce-output-and-scale", reduce(scale=vec()),
     "fusedres: give output or scale (the ReLU mask's source), not both"),
    ("reduce-shift-without-scale", reduce(output=None, shift=vec()),
     "fusedres: shift needs scale (the ReLU mask's recomputation)"),
    ("reduce-scale-dtype", reduce(output=None, scale=vec(dtype=F64)),
     "fusedres: scale must be Float, got Double"),
    ("reduce-grad-dtype-int", reduce(grad_dtype=torch.int32),
     "fusedres: grad_dtype must be a floating point type, got Int"),
    ("input-shift-length", grad_input(output=None, scale=vec(), shift=vec(5)),
     "fusedres: shift must have shape (4,), got [5]"),
    ("input-sum-dy-length", grad_input(sum_dy=vec(3)),
     "fusedres: sum_dy must have shape (4,), got [3]"),
    ("input-sum-dy-xhat-dtype", grad_input(sum_dy_xhat=vec(dtype=F64)),
     "fusedres: sum_dy_xhat must be Float, got Double"),
    ("input-weight-length", grad_input(weight=vec(5)),
     "fusedres: weight must have shape (4,), got [5]"),
    ("input-weight-device", grad_input(weight=meta_vec()),
     "fusedres: weight is on meta but input is on cpu"),
    ("dual-backward-output-shape", dual_backward(output=x(2, C, 3, 1)),
     "fusedres: output must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 1]"),
    ("dual-backward-residual-dtype", dual_backward(residual=x(dtype=F64)),
     "fusedres: residual must have the dtype of input (Float), got Double"),
    ("dual-backward-residual-mean-length", dual_backward(residual_mean=vec(3)),
     "fusedres: residual_mean must have shape (4,), got [3]"),
    ("dual-backward-residual-invstd-dtype", dual_backward(residual_invstd=vec(dtype=F64)),
     "fusedres: residual_invstd must be Float, got Double"),
    ("dual-backward-residual-weight-device", dual_backward(residual_weight=meta_vec()),
     "fusedres: residual_weight is on meta but input is on cpu"),
    ("dual-backward-grad-dtype-int", dual_backward(residual_grad_dtype=torch.int32),
     "fusedres: residual_grad_dtype must be a floating point type, got Int"),
    ("add-relu-shape", ("add_relu", x(), x(2, C, 3, 4)),
     "fusedres: residual must have the shape of input [2, 4, 3, 3], got [2, 4, 3, 4]"),
    ("add-relu-dtype", ("add_relu", x(), x(dtype=F64)),
     "fusedres: residual must have the dtype of input (Float), got Double"),
]
# (id, changes, message): for conv_bias_relu / conv_bias_add_relu / fused_conv2d
CONV_CASES = [
    ("input-3d", dict(input=x(2, C, 5)), "fusedres: input must have shape (N, C, H, W), got "
                                         "[2, 4, 5]"),
    ("weight-3d", dict(weight=make((8, C, 3))), "fusedres: weight must have shape (C_out, C_in "
                                                "/ groups, kH, kW), got [8, 4, 3]"),
    ("weight-dtype", dict(weight=make((8, C, 3, 3), F64)),
     "fusedres: weight must have the dtype of input (Float), got Double"),
    ("groups", dict(groups=2), "fusedres: input has 4 channels but weight expects 8 "
                               "(weight.size(1) * groups)"),
    ("stride-0", dict(stride=[0, 1]), "fusedres: stride must be positive, got [0, 1]"),
    ("padding-negative", dict(padding=[1, -1]),
     "fusedres: padding must be non-negative, got [1, -1]"),
    ("stride-3-values", dict(stride=[1, 1, 1]),
     "fusedres: stride, padding and dilation must have 2 values each"),
    ("bias-length", dict(bias=vec(4)), "fusedres: bias must have shape (8,), got [4]"),
    ("bias-device", dict(bias=meta_vec(8)), "fusedres: bias is on meta but input is on cpu"),
]
RESIDUAL_CASES = [
    ("residual-shape", dict(residual=x(2, 8, 4, 5)),
     "fusedres: residual must have the convolution's output shape [2, 8, 5, 5], got "
     "[2, 8, 4, 5]"),
    ("residual-dtype", dict(residual=x(2, 8, 5, 5, dtype=F64)),
     "fusedres: residual must have the dtype of input (Float), got Double"),
]
TRITON_CONV_CASES = [
    ("scale-dtype", fused_conv2d(scale=vec(dtype=F64)),
     "fusedres: input_scale must be Float, got Double"),
    ("shift-length", fused_conv2d(shift=vec(3)),
     "fusedres: input_shift must have shape (4,), got [3]"),
    ("float64", fused_conv2d(input=x(2, C, 5, 5, dtype=F64), weight=make((8, C, 3, 3), F64),
                       residual=x(2, 8, 5, 5, dtype=F64)),
     "fusedres: the Triton convolution takes Half, BFloat16 or Float input, got Double"),
]


def all_cases():
    for id, call, message in CASES:
        yield pytest.param(call, message, ("fusedres", "fusedres_emulated", "fusedres_triton"),
                           id=id)
    for id, change, message in CONV_CASES + RESIDUAL_CASES:
        yield pytest.param(conv_bias_add_relu(**change), message,
                           ("fusedres", "fusedres_emulated"), id=f"conv-add-{id}")
        yield pytest.param(fused_conv2d(**change), message, ("fusedres_triton",),
                           id=f"fused-conv2d-{id}")
    for id, change, message in CONV_CASES:
        yield pytest.param(conv_bias_relu(**change), message, ("fusedres", "fusedres_emulated"),
                           id=f"conv-{id}")
    for id, call, message in TRITON_CONV_CASES:
        yield pytest.param(call, message, ("fusedres_triton",), id=f"fused-conv2d-{id}")


def namespaces(wanted):
    """The namespaces of `wanted` that can run here."""
    available = fusedres.info()["available"]
    runnable = {"fusedres": available["cpp"], "fusedres_emulated": available["cuda-emulated"],
                "fusedres_triton": HAS_TRITON}
    if available["cuda-emulated"]:
        with fusedres.backend("cuda-emulated"):
            fusedres._backend.resolve(torch.device("cpu"))  # loads the emulation build
    return [ns for ns in wanted if runnable[ns]]


def first_line(e):
    return str(e).split("\n")[0]


@pytest.mark.parametrize("call, message, wanted", list(all_cases()))
def test_raw_ops_refuse_bad_arguments(call, message, wanted):
    name, *args = call
    ran = []
    for ns in namespaces(wanted):
        with pytest.raises(RuntimeError) as e:
            getattr(getattr(torch.ops, ns), name)(*args)
        assert first_line(e.value) == message, f"{ns}::{name}"
        ran.append(ns)
        # The fake kernel (torch.compile, FakeTensorMode) refuses it the same way.
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                         for a in args]
            with pytest.raises(RuntimeError) as e:
                getattr(getattr(torch.ops, ns), name)(*fake_args)
        assert first_line(e.value) == message, f"fake {ns}::{name}"
    assert ran, "no namespace could run the case"


def test_every_op_has_contract_cases():
    """Each op of every namespace has at least one bad-argument case above."""
    from fusedres._ops import NAMESPACE_OPS
    covered = {p.values[0][0] for p in all_cases()}
    ops = set().union(*NAMESPACE_OPS.values())
    assert ops <= covered, ops - covered
