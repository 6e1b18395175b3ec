"""The fused ops, as functions. Each mirrors the unfused PyTorch computation it replaces
(see fusedres.reference) and runs on the active backend (fusedres.set_backend).

Arguments are checked here, before any kernel runs, and errors name the argument.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend, reference
from ._extension import cpp_loaded

from ._ops import register

if cpp_loaded:
    register("fusedres")  # fake kernels and autograd of the C++ ops

__all__ = [
    "batch_norm_relu",
    "batch_norm_add_relu",
    "dual_batch_norm_add_relu",
    "add_batch_norm_relu",
    "add_relu",
    "fold_conv_bn",
    "conv_bias_relu",
    "conv_bias_add_relu",
    "fused_conv2d",
]

_fused_ops = _backend.op_library  # the torch.ops namespace of a compiled backend


def _call(op, *args):
    """op(*args). When no gradient can flow through it (no_grad, or no input requires grad),
    below the Autograd dispatch key: the Python autograd wrapper of a torch.library op costs a
    few microseconds per call even then, which small models feel. (torch.compile traces the
    op as it is.)"""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_IntOrPair = Union[int, Sequence[int]]


# ---- argument checks ------------------------------------------------------------------------


def _check_input(input, name="input", min_dim=2):
    if not isinstance(input, Tensor):
        raise TypeError(f"fusedres: {name} must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fusedres: {name} must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    if input.dim() < min_dim:
        raise ValueError(
            f"fusedres: {name} must have shape (N, C, ...) with at least {min_dim} dimensions, "
            f"got shape {tuple(input.shape)}"
        )


def _check_like(t, input, name, shape=None, what="the shape of input"):
    """t must be a Tensor of input's dtype and device, and of `shape` (default: input's)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fusedres: {name} must be a Tensor, got {type(t).__name__}")
    shape = tuple(input.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"fusedres: {name} must have {what} {shape}, got {tuple(t.shape)}")
    if t.dtype != input.dtype:
        raise TypeError(f"fusedres: {name} must have the dtype of input ({input.dtype}), got {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(f"fusedres: {name} is on {t.device} but input is on {input.device}")


def _check_channel_vector(t, input, name, channels=None, input_name="input"):
    if t is None:
        return
    channels = input.shape[1] if channels is None else channels
    if not isinstance(t, Tensor):
        raise TypeError(f"fusedres: {name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fusedres: {name} must be a floating point tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"fusedres: {name} should contain {channels} elements (one per channel), "
            f"got shape {tuple(t.shape)}"
        )
    if t.device != input.device:
        raise RuntimeError(
            f"fusedres: {name} is on {t.device} but {input_name} is on {input.device}")


def _check_parameter_dtypes(input, named, prefix=""):
    """As torch.nn.functional.batch_norm: the per-channel tensors given share one dtype, the
    input's or, for a float16 / bfloat16 input, float32."""
    given = [(prefix + name, t) for name, t in named if t is not None]
    if not given:
        return
    allowed = [input.dtype] + ([torch.float32] if input.dtype in _HALF_DTYPES else [])
    first_name, first = given[0]
    if first.dtype not in allowed:
        raise TypeError(
            f"fusedres: {first_name} must be {' or '.join(map(str, allowed))} for a "
            f"{input.dtype} input (as in torch.nn.functional.batch_norm), got {first.dtype}"
        )
    for name, t in given[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"fusedres: {name} must have the dtype of {first_name} ({first.dtype}), "
                f"got {t.dtype}"
            )


def _check_bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked, prefix=""):
    _check_channel_vector(running_mean, input, prefix + "running_mean")
    _check_channel_vector(running_var, input, prefix + "running_var")
    _check_channel_vector(weight, input, prefix + "weight")
    _check_channel_vector(bias, input, prefix + "bias")
    _check_parameter_dtypes(input, [("running_mean", running_mean), ("running_var", running_var),
                                    ("weight", weight), ("bias", bias)], prefix)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"fusedres: {prefix}running_mean and {prefix}running_var must both be given or both be None"
        )
    if not training and running_mean is None:
        raise RuntimeError(f"fusedres: {prefix}running_mean must be defined in evaluation mode")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"fusedres: {prefix}eps must be a non-negative number, got {eps!r}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError(
                f"fusedres: {prefix}momentum=None (a cumulative average) needs "
                f"{prefix}num_batches_tracked"
            )
    elif not isinstance(momentum, (int, float)):
        raise TypeError(f"fusedres: {prefix}momentum must be a float or None, got {momentum!r}")
    if num_batches_tracked is not None:
        _check_counter(num_batches_tracked, input, prefix + "num_batches_tracked")
    if training and input.numel() > 0 and input.numel() // input.shape[1] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.shape}"
        )


def _check_counter(t, input, name):
    """nn.BatchNorm2d's num_batches_tracked: one element, on input's device (or a CPU scalar)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fusedres: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(
            f"fusedres: {name} must have one element (a counter), got shape {tuple(t.shape)}")
    if t.device != input.device and not (t.dim() == 0 and t.device.type == "cpu"):
        raise RuntimeError(f"fusedres: {name} is on {t.device} but input is on {input.device}")


# ---- batch norm -----------------------------------------------------------------------------


def _momentum_factor(training, momentum, num_batches_tracked, running_mean):
    """nn.BatchNorm2d's exponential_average_factor; counts the batch in num_batches_tracked."""
    if not training or num_batches_tracked is None:
        return momentum
    with torch.no_grad():
        num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average
        # 1 / count as a tensor (no host sync), in double for double statistics: a float
        # factor would put float rounding (1e-8) into a float64 model's running statistics.
        dtype = torch.float64 if getattr(running_mean, "dtype", None) == torch.float64 \
            else torch.float32
        return 1.0 / num_batches_tracked.to(dtype)
    return momentum


def _update_running_stats(running_mean, running_var, mean, var, count, factor):
    """running = (1 - factor) * running + factor * batch, with the unbiased variance."""
    if running_mean is None or count == 0:
        return
    with torch.no_grad():
        # running += factor * (batch - running) for both buffers in one multi-tensor op (one
        # launch on a GPU, not eight); the unbiased variance written in the buffers' dtype.
        unbiased = torch.mul(var, count / max(count - 1, 1), out=torch.empty_like(running_var))
        batch = [mean.to(running_mean.dtype), unbiased]
        if isinstance(factor, Tensor):  # cumulative average: 1 / num_batches_tracked
            for running, value in zip((running_mean, running_var), batch):
                running.lerp_(value, factor.to(running.dtype))
        else:
            torch._foreach_lerp_([running_mean, running_var], batch, factor)


def _op_running_stats(input, running_mean, running_var, num_batches_tracked, momentum):
    """The running statistics as the training ops take them, to update in their statistics
    pass (no ops of their own), or None where a counter is not one int64 on input's device or
    a statistic is not contiguous (nn.BatchNorm2d's buffers always are): _momentum_factor and
    _update_running_stats then do it."""
    if num_batches_tracked is not None and (num_batches_tracked.dtype != torch.int64
                                            or num_batches_tracked.device != input.device):
        return None
    if running_mean is not None and not (running_mean.is_contiguous()
                                         and running_var.is_contiguous()):
        return None
    return (running_mean, running_var, num_batches_tracked,
            None if momentum is None else float(momentum))


_NO_RUNNING_STATS = (None, None, None, 0.1)


def _eval_coefficients(ops, input, running_mean, running_var, weight, bias, eps):
    """Eval BN as out = (x - mean) * scale + shift, in float (double for double inputs): one
    launch of batch_norm_coefficients. Its outputs are new tensors, so that a later training
    step's in-place update of running_mean cannot invalidate a graph that saved them (as
    F.batch_norm's eval backward survives that too)."""
    return _call(ops.batch_norm_coefficients, input, running_mean, running_var, weight, bias,
                 float(eps))


def _batch_norm_act(input, residual, running_mean, running_var, weight, bias, training,
                    momentum, eps, relu, num_batches_tracked):
    _check_input(input)
    if residual is not None:
        _check_like(residual, input, "residual")
    _check_bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked)
    backend = _backend.resolve(input.device)
    running = _op_running_stats(input, running_mean, running_var, num_batches_tracked,
                                momentum) if training and backend != "reference" else None
    if running is None:
        factor = _momentum_factor(training, momentum, num_batches_tracked, running_mean)
    if backend == "reference":
        return reference.batch_norm_act(input, residual, running_mean, running_var, weight,
                                        bias, training, factor, eps, relu)
    ops = _fused_ops(backend)
    if not training:
        mean, scale, shift = _eval_coefficients(ops, input, running_mean, running_var, weight,
                                                bias, eps)
        return _call(ops.batch_norm_apply, input, mean, scale, shift, residual, None, None, None,
                     relu)
    out, mean, var, *_ = ops.batch_norm_act_train(
        input, weight, bias, residual, float(eps), relu, *(running or _NO_RUNNING_STATS))
    if running is None:
        count = input.numel() // input.shape[1] if input.numel() else 0
        _update_running_stats(running_mean, running_var, mean, var, count, factor)
    return out


def batch_norm_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """relu(batch_norm(input)), arguments as torch.nn.functional.batch_norm.

    In training, batch statistics normalise the input and update running_mean / running_var
    in place (unbiased variance) when they are given. With num_batches_tracked (a tensor, as
    nn.BatchNorm2d's buffer) the batch is counted, and momentum=None then means a cumulative
    average, exactly as nn.BatchNorm2d. relu=False gives plain batch norm.
    """
    return _batch_norm_act(input, None, running_mean, running_var, weight, bias, training,
                           momentum, eps, relu, num_batches_tracked)


def batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """relu(batch_norm(input) + residual): the end of a ResNet block. See batch_norm_relu."""
    if residual is None:
        raise TypeError("fusedres: residual must be a Tensor, got None (use batch_norm_relu)")
    return _batch_norm_act(input, residual, running_mean, running_var, weight, bias, training,
                           momentum, eps, relu, num_batches_tracked)


def dual_batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    residual_running_mean: Optional[Tensor],
    residual_running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual_weight: Optional[Tensor] = None,
    residual_bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    residual_momentum: Optional[float] = None,
    residual_eps: Optional[float] = None,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
    residual_num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """relu(batch_norm(input) + batch_norm(residual)): a block with a projection shortcut,
    whose shortcut BN has its own statistics and parameters (residual_*). residual_momentum
    and residual_eps default to momentum and eps.
    """
    residual_momentum = momentum if residual_momentum is None else residual_momentum
    residual_eps = eps if residual_eps is None else residual_eps
    _check_input(input)
    _check_like(residual, input, "residual")
    _check_bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked)
    _check_bn_args(residual, residual_running_mean, residual_running_var, residual_weight,
                   residual_bias, training, residual_momentum, residual_eps,
                   residual_num_batches_tracked, prefix="residual_")
    backend = _backend.resolve(input.device)
    fused_training = training and backend != "reference"
    running = _op_running_stats(input, running_mean, running_var, num_batches_tracked,
                                momentum) if fused_training else None
    residual_running = _op_running_stats(
        residual, residual_running_mean, residual_running_var, residual_num_batches_tracked,
        residual_momentum) if fused_training else None
    if running is None:
        factor = _momentum_factor(training, momentum, num_batches_tracked, running_mean)
    if residual_running is None:
        residual_factor = _momentum_factor(training, residual_momentum,
                                           residual_num_batches_tracked, residual_running_mean)
    if backend == "reference":
        bn_residual = reference.batch_norm(residual, residual_running_mean, residual_running_var,
                                           residual_weight, residual_bias, training,
                                           residual_factor, residual_eps)
        return reference.batch_norm_act(input, bn_residual, running_mean, running_var, weight,
                                        bias, training, factor, eps, relu)
    if not training:
        ops = _fused_ops(backend)
        mean, scale, shift = _eval_coefficients(ops, input, running_mean, running_var, weight,
                                                bias, eps)
        residual_coefficients = _eval_coefficients(
            ops, residual, residual_running_mean, residual_running_var, residual_weight,
            residual_bias, residual_eps)
        return _call(ops.batch_norm_apply, input, mean, scale, shift, residual,
                     *residual_coefficients, relu)
    out, mean, var, _, residual_mean, residual_var, _ = _fused_ops(
        backend).dual_batch_norm_act_train(input, weight, bias, residual, residual_weight,
                                           residual_bias, float(eps), float(residual_eps), relu,
                                           *(running or _NO_RUNNING_STATS),
                                           *(residual_running or _NO_RUNNING_STATS))
    count = input.numel() // input.shape[1] if input.numel() else 0
    if running is None:
        _update_running_stats(running_mean, running_var, mean, var, count, factor)
    if residual_running is None:
        _update_running_stats(residual_running_mean, residual_running_var, residual_mean,
                              residual_var, count, residual_factor)
    return out


def add_batch_norm_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(sum, relu(batch_norm(sum))) with sum = input + residual: the end of a pre-activation
    block (sum, the next shortcut) and the start of the next (the BN + ReLU of the sum). The
    BN's arguments as batch_norm_relu.

    In training one op: the statistics pass writes the sum as it reads input and residual,
    the normalize pass reads it; the backward recomputes the ReLU mask from the sum and adds
    the gradient the sum receives directly. In eval: the add, then the fused BN + ReLU.
    """
    _check_input(input)
    _check_like(residual, input, "residual")
    _check_bn_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked)
    backend = _backend.resolve(input.device)
    if not training or backend == "reference":
        total = input + residual
        return total, _batch_norm_act(total, None, running_mean, running_var, weight, bias,
                                      training, momentum, eps, relu, num_batches_tracked)
    running = _op_running_stats(input, running_mean, running_var, num_batches_tracked, momentum)
    if running is None:
        factor = _momentum_factor(training, momentum, num_batches_tracked, running_mean)
    out, total, mean, var, *_ = _fused_ops(backend).add_batch_norm_act_train(
        input, residual, weight, bias, float(eps), relu, *(running or _NO_RUNNING_STATS))
    if running is None:
        count = input.numel() // input.shape[1] if input.numel() else 0
        _update_running_stats(running_mean, running_var, mean, var, count, factor)
    return total, out


# ---- residual epilogue ----------------------------------------------------------------------


def add_relu(input: Tensor, residual: Tensor) -> Tensor:
    """relu(input + residual) in one pass."""
    _check_input(input, min_dim=1)
    _check_like(residual, input, "residual")
    backend = _backend.resolve(input.device)
    if input.dim() < 2 or backend == "reference":
        return reference.add_relu(input, residual)
    return _call(_fused_ops(backend).add_relu, input, residual)


# ---- folded inference -----------------------------------------------------------------------


def fold_conv_bn(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_running_mean: Tensor,
    bn_running_var: Tensor,
    bn_eps: float,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a convolution with the eval BatchNorm after it folded in:
    weight * g / sqrt(v + eps) and (bias - m) * g / sqrt(v + eps) + beta, computed in float
    (double for double weights) and cast back to the convolution's dtype (the weight's dtype
    for the new bias of a conv without one).
    """
    _check_input(conv_weight, "conv_weight", min_dim=3)
    out_channels = conv_weight.shape[0]
    for t, name in ((conv_bias, "conv_bias"), (bn_running_mean, "bn_running_mean"),
                    (bn_running_var, "bn_running_var"), (bn_weight, "bn_weight"),
                    (bn_bias, "bn_bias")):
        _check_channel_vector(t, conv_weight, name, channels=out_channels,
                              input_name="conv_weight")
    if bn_running_mean is None or bn_running_var is None:
        raise ValueError("fusedres: bn_running_mean and bn_running_var are required to fold a BN")
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or bn_eps < 0:
        raise ValueError(f"fusedres: bn_eps must be a non-negative number, got {bn_eps!r}")
    # Plain per-channel math: the Triton backend uses the reference formula.
    if _backend.resolve(conv_weight.device) in ("reference", "triton"):
        return reference.fold_conv_bn(conv_weight, conv_bias, bn_running_mean, bn_running_var,
                                      bn_eps, bn_weight, bn_bias)
    return torch.ops.fusedres.fold_conv_bn(conv_weight, conv_bias, bn_running_mean,
                                           bn_running_var, float(bn_eps), bn_weight, bn_bias)


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"fusedres: {name} must be an int or a pair of ints, got {v!r}")
    return v


def _check_conv_args(input, weight, bias, residual, stride, padding, dilation, groups):
    """Checks the convolution's arguments (as F.conv2d would, but before any kernel runs);
    returns stride, padding, dilation as pairs."""
    _check_input(input)
    if input.dim() != 4:
        raise ValueError(f"fusedres: input must have shape (N, C, H, W), got {tuple(input.shape)}")
    _check_input(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(
            f"fusedres: weight must have shape (C_out, C_in / groups, kH, kW), got {tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
        raise TypeError(f"fusedres: weight must have the dtype of input ({input.dtype}), got {weight.dtype}")
    if weight.device != input.device:
        raise RuntimeError(f"fusedres: weight is on {weight.device} but input is on {input.device}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fusedres: groups must be a positive int, got {groups!r}")
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"fusedres: input has {input.shape[1]} channels but weight expects "
            f"{weight.shape[1]} x groups={groups}"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"fusedres: weight must have a multiple of groups={groups} output "
                         f"channels, got shape {tuple(weight.shape)}")
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"fusedres: weight must have a kernel of at least 1x1, got shape "
                         f"{tuple(weight.shape)}")
    _check_channel_vector(bias, input, "bias", channels=weight.shape[0])
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    if min(stride) < 1:
        raise ValueError(f"fusedres: stride must be positive, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"fusedres: padding must be non-negative, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"fusedres: dilation must be positive, got {dilation}")
    out_shape = reference.conv_output_shape(input, weight, stride, padding, dilation)
    if min(out_shape[2:]) < 1:
        padded = [input.shape[d + 2] + 2 * padding[d] for d in range(2)]
        kernel = [dilation[d] * (weight.shape[d + 2] - 1) + 1 for d in range(2)]
        raise ValueError(
            f"fusedres: input's padded size must be at least the (dilated) kernel size "
            f"{kernel[0]}x{kernel[1]}, got {padded[0]}x{padded[1]} (input "
            f"{input.shape[2]}x{input.shape[3]}, padding {padding})"
        )
    if residual is not None:
        _check_like(residual, input, "residual", shape=out_shape,
                    what="the convolution's output shape")
    return stride, padding, dilation


def _triton_conv_dtype(input):
    if input.dtype == torch.float64:
        raise TypeError("fusedres: the Triton convolution takes float16, bfloat16 or float32 "
                        "inputs, got torch.float64")
    if input.dtype == torch.bfloat16 and input.device.type == "cpu":
        # The interpreter's bfloat16 matrix product returns garbage: refuse rather than lie.
        raise TypeError("fusedres: the Triton interpreter computes bfloat16 matrix products "
                        "wrongly; run the bfloat16 Triton convolution on a GPU")


def _conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups):
    stride, padding, dilation = _check_conv_args(input, weight, bias, residual, stride, padding,
                                                 dilation, groups)
    backend = _backend.resolve(input.device)
    if backend == "reference":
        return reference.conv_bias_act(input, weight, bias, residual, stride, padding, dilation,
                                       groups)
    if backend == "triton":
        _triton_conv_dtype(input)
        return _call(torch.ops.fusedres_triton.fused_conv2d, input, weight, bias, residual, None, None,
                     stride, padding, dilation, groups, False, True, False)[0]
    ops = _fused_ops(backend)
    if residual is None:
        return _call(ops.conv_bias_relu, input, weight, bias, stride, padding, dilation, groups)
    return _call(ops.conv_bias_add_relu, input, weight, bias, residual, stride, padding,
                 dilation, groups)


def conv_bias_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   stride: _IntOrPair = 1, padding: _IntOrPair = 0, dilation: _IntOrPair = 1,
                   groups: int = 1) -> Tensor:
    """relu(conv2d(input, weight, bias)): a convolution with its BN folded in (fold_conv_bn).
    CUDA: cuDNN's fused kernel; CPU: the convolution, then one epilogue pass."""
    return _conv_bias_act(input, weight, bias, None, stride, padding, dilation, groups)


def conv_bias_add_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor,
                       stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                       dilation: _IntOrPair = 1, groups: int = 1) -> Tensor:
    """relu(conv2d(input, weight, bias) + residual): the folded end of a ResNet block."""
    if residual is None:
        raise TypeError("fusedres: residual must be a Tensor, got None (use conv_bias_relu)")
    return _conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups)


def fused_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    *,
    input_scale: Optional[Tensor] = None,
    input_shift: Optional[Tensor] = None,
    input_relu: bool = True,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    return_stats: bool = False,
):
    """A convolution with the BN before it applied on the fly and the BN after it prepared:

        a   = relu?(input * input_scale[c] + input_shift[c])    (prologue, when input_scale)
        out = relu?(conv2d(a, weight, bias) + residual)          (epilogue)

    With return_stats=True returns (out, mean, var): the per-channel mean and biased variance
    of out (float32, not differentiable), i.e. the batch statistics of the BN that follows.
    On the `triton` backend this is one kernel (the prologue is applied while loading and a
    is never written to memory; the backward recomputes it); the other backends compute the
    same thing unfused with PyTorch ops.
    """
    stride, padding, dilation = _check_conv_args(input, weight, bias, residual, stride, padding,
                                                 dilation, groups)
    if (input_scale is None) != (input_shift is None):
        raise ValueError("fusedres: input_scale and input_shift must be given together")
    _check_channel_vector(input_scale, input, "input_scale")
    _check_channel_vector(input_shift, input, "input_shift")
    if _backend.resolve(input.device) == "triton":
        _triton_conv_dtype(input)
        scale = input_scale.float() if input_scale is not None else None
        shift = input_shift.float() if input_shift is not None else None
        out, mean, var = torch.ops.fusedres_triton.fused_conv2d(
            input, weight, bias, residual, scale, shift, stride, padding, dilation, groups,
            input_relu, relu, return_stats)
    else:
        out, mean, var = reference.fused_conv2d(
            input, weight, bias, residual, input_scale, input_shift, stride, padding, dilation,
            groups, input_relu, relu, True)
    return (out, mean, var) if return_stats else out
