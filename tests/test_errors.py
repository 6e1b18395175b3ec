"""Invalid input raises a clear error naming the argument, before any kernel runs."""
import pytest
import torch

import fusedres
import fusedres.functional as FF
from conftest import make

C = 4


def good():
    return dict(input=make((2, C, 3, 3)), running_mean=torch.zeros(C), running_var=torch.ones(C),
                weight=torch.ones(C), bias=torch.zeros(C))


@pytest.fixture(params=["cpp", "reference"], autouse=True)
def each_backend(request):
    with fusedres.backend(request.param):
        yield


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(input=torch.randn(5)), ValueError, "input must have shape \\(N, C, ...\\)"),
        (dict(input=torch.ones(2, C, 3, 3, dtype=torch.int64)), TypeError, "input must be float16"),
        (dict(input=torch.ones(2, C, 3, 3, dtype=torch.complex64)), TypeError, "input must be float16"),
        (dict(input=[1.0, 2.0]), TypeError, "input must be a Tensor"),
        (dict(running_mean=torch.zeros(C + 1)), ValueError, "running_mean should contain 4 elements"),
        (dict(running_var=torch.ones(C, 1)), ValueError, "running_var should contain 4 elements"),
        (dict(weight=torch.ones(3)), ValueError, "weight should contain 4 elements"),
        (dict(bias=torch.zeros(C, dtype=torch.int32)), TypeError, "bias must be a floating point"),
        (dict(running_mean=None), ValueError, "running_mean and running_var must both be given"),
        (dict(running_mean=None, running_var=None), RuntimeError,
         "running_mean must be defined in evaluation mode"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
        (dict(momentum="0.1"), TypeError, "momentum must be a float or None"),
    ],
)
def test_batch_norm_relu_bad_arguments(change, error, message):
    args = {**good(), **change}
    with pytest.raises(error, match=message):
        FF.batch_norm_relu(**args)


def test_one_value_per_channel_in_training():
    args = good()
    args["input"] = make((1, C, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        FF.batch_norm_relu(**args, training=True)
    FF.batch_norm_relu(**args, training=False)  # fine in eval


def test_momentum_none_needs_num_batches_tracked():
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        FF.batch_norm_relu(**good(), training=True, momentum=None)


@pytest.mark.parametrize(
    "residual, error, message",
    [
        (make((2, C, 3, 4)), ValueError, "residual must have the shape of input"),
        (make((2, C, 3, 3), dtype=torch.float64), TypeError, "residual must have the dtype of input"),
        (None, TypeError, "residual must be a Tensor, got None"),
    ],
)
def test_bad_residual(residual, error, message):
    args = good()
    with pytest.raises(error, match=message):
        FF.batch_norm_add_relu(args.pop("input"), residual, **args)


def test_dual_bad_residual_statistics_are_named():
    args = good()
    with pytest.raises(ValueError, match="residual_running_var should contain 4 elements"):
        FF.dual_batch_norm_add_relu(args["input"], make((2, C, 3, 3)), args["running_mean"],
                                    args["running_var"], torch.zeros(C), torch.ones(5))


def test_add_relu_bad_arguments():
    with pytest.raises(ValueError, match="residual must have the shape of input"):
        FF.add_relu(make((2, 3, 4, 4)), make((2, 3, 4, 5)))
    with pytest.raises(TypeError, match="input must be float16"):
        FF.add_relu(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32))


def test_conv_bad_arguments():
    x, w = make((2, 4, 5, 5)), make((8, 4, 3, 3))
    with pytest.raises(ValueError, match="input has 4 channels but weight expects 3"):
        FF.conv_bias_relu(x, make((8, 3, 3, 3)))
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        FF.conv_bias_relu(x, w.double())
    with pytest.raises(ValueError, match="bias should contain 8 elements"):
        FF.conv_bias_relu(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="input must have shape \\(N, C, H, W\\)"):
        FF.conv_bias_relu(make((2, 4, 5)), w)
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        FF.conv_bias_relu(x, w, stride=(1, 1, 1))


def test_fold_conv_bn_bad_arguments():
    w = make((8, 4, 3, 3))
    with pytest.raises(ValueError, match="bn_running_mean should contain 8 elements"):
        FF.fold_conv_bn(w, None, torch.zeros(4), torch.ones(8), 1e-5, None, None)
    with pytest.raises(TypeError, match="conv_weight must be float16"):
        FF.fold_conv_bn(w.long(), None, torch.zeros(8), torch.ones(8), 1e-5, None, None)


def test_cpp_ops_check_their_arguments_too():
    """The C++ ops validate on their own (for users of torch.ops.fusedres directly)."""
    ops = torch.ops.fusedres
    x = make((2, C, 3, 3))
    with pytest.raises(RuntimeError, match="scale must have shape \\(4,\\)"):
        ops.batch_norm_apply(x, torch.zeros(C), torch.ones(3), None, None, None, None, None, True)
    with pytest.raises(RuntimeError, match="mean must be Float"):
        ops.batch_norm_apply(x, torch.zeros(C, dtype=torch.float64), torch.ones(C), None, None,
                             None, None, None, True)
    with pytest.raises(RuntimeError, match="input must be a floating point tensor"):
        ops.batch_norm_stats(torch.ones(2, C, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        ops.batch_norm_act_train(make((1, C)), None, None, None, 1e-5, True)


@pytest.mark.parametrize("call, message", [
    (lambda ops, x, w, z: ops.conv_bias_add_relu(x, w, None, z, [0, 1], [1, 1], [1, 1], 1),
     "stride must be positive"),  # divided by when sizing the residual: once a crash
    (lambda ops, x, w, z: ops.conv_bias_relu(x, w, None, [1, 1], [1, 1], [0, 1], 1),
     "dilation must be positive"),
    (lambda ops, x, w, z: ops.conv_bias_relu(x, w, None, [1, 1], [-1, 1], [1, 1], 1),
     "padding must be non-negative"),
    (lambda ops, x, w, z: ops.conv_bias_relu(x, w[..., :0, :0], None, [1, 1], [1, 1], [1, 1], 1),
     "kernel of at least 1x1"),
    (lambda ops, x, w, z: ops.conv_bias_relu(x, w, torch.zeros(8, dtype=torch.int64), [1, 1],
                                             [1, 1], [1, 1], 1), "bias must be a floating"),
    (lambda ops, x, w, z: ops.batch_norm_act_train(x, torch.ones(C, dtype=torch.int64), None,
                                                   None, 1e-5, True), "weight must be a floating"),
    (lambda ops, x, w, z: ops.fold_conv_bn(w, None, torch.zeros(8, dtype=torch.int64),
                                           torch.ones(8), 1e-5, None, None),
     "bn_running_mean must be a floating"),
    (lambda ops, x, w, z: ops.fold_conv_bn(w, None, torch.zeros(8), torch.ones(8), -1.0, None,
                                           None), "bn_eps must be non-negative"),
])
def test_cpp_conv_and_fold_ops_check_their_arguments(call, message):
    """Direct torch.ops.fusedres calls (no Python checks in front) refuse bad arguments."""
    x, w, z = make((2, C, 5, 5)), make((8, C, 3, 3)), make((2, 8, 5, 5))
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.fusedres, x, w, z)
