// Op schemas of the fusedres library. Kernels are registered per dispatch key in csrc/cpu/
// and csrc/cuda/; fake (meta) kernels and autograd formulas in fusedres/_ops.py.
//
// OP INDEX: where each op lives (tests/test_packaging.py checks that every schema below is
// here and every path exists). The math is the comment above its schema in this file; its
// contract, fake kernel and autograd are its section of fusedres/_ops.py; the same op of the
// Triton namespace (fusedres_triton::<op>) is in kernels/; shared checks in csrc/common.h.
//
// batch_norm_stats            cpu: csrc/cpu/batch_norm_stats.cpp (host code: csrc/channel_stats.h)
//                             cuda: csrc/cuda/batch_norm_stats.cu
//                             triton: kernels/batch_norm_stats.py
//                             used by: fusedres/sync_batchnorm.py
// add_batch_norm_stats        cpu: csrc/cpu/batch_norm_stats.cpp (host code: csrc/channel_stats.h)
//                             cuda: csrc/cuda/batch_norm_stats.cu
//                             triton: kernels/batch_norm_stats.py
//                             used by: add_batch_norm_act_train
// batch_norm_apply            cpu: csrc/cpu/batch_norm_apply.cpp (host code: csrc/normalize_act.h)
//                             cuda: csrc/cuda/batch_norm_apply.cu
//                             triton: kernels/batch_norm_apply.py
//                             used by: fusedres/functional.py (eval forms of batch_norm_relu,
//                             batch_norm_add_relu, dual_batch_norm_add_relu)
// batch_norm_coefficients     cpu: csrc/cpu/batch_norm_apply.cpp (host code: csrc/normalize_act.h)
//                             cuda: csrc/cuda/batch_norm_apply.cu
//                             triton: kernels/batch_norm_apply.py
//                             used by: fusedres/functional.py (the eval forms, before
//                             batch_norm_apply)
// batch_norm_act_train        cpu, cuda: csrc/batch_norm_train.h (stats + apply), registered
//                             with each device's statistics (csrc/{cpu,cuda}/batch_norm_stats.*)
//                             triton: kernels/batch_norm_train.py
//                             used by: fusedres/functional.py (training batch_norm_relu,
//                             batch_norm_add_relu)
// dual_batch_norm_act_train   cpu, cuda: csrc/batch_norm_train.h
//                             triton: kernels/batch_norm_train.py
//                             used by: fusedres/functional.py (training dual_batch_norm_add_relu)
// add_batch_norm_act_train    cpu, cuda: csrc/batch_norm_train.h
//                             triton: kernels/batch_norm_train.py
//                             used by: fusedres/functional.py (training add_batch_norm_relu:
//                             the pre-activation ResNet's block-ending add + next BN + ReLU)
// batch_norm_backward_reduce  cpu: csrc/cpu/batch_norm_backward.cpp
//                             cuda: csrc/cuda/batch_norm_backward.cu
//                             triton: kernels/batch_norm_backward.py
//                             used by: fusedres/_ops.py (backwards), fusedres/sync_batchnorm.py
// batch_norm_backward_input   cpu: csrc/cpu/batch_norm_backward.cpp
//                             cuda: csrc/cuda/batch_norm_backward.cu
//                             triton: kernels/batch_norm_backward.py
//                             used by: fusedres/_ops.py (backwards), fusedres/sync_batchnorm.py
// dual_batch_norm_backward    cpu: csrc/cpu/batch_norm_backward.cpp
//                             cuda: csrc/cuda/batch_norm_backward.cu
//                             triton: kernels/batch_norm_backward.py
//                             used by: fusedres/_ops.py (dual_batch_norm_act_train's backward)
// add_relu                    cpu: csrc/cpu/add_relu.cpp   cuda: csrc/cuda/add_relu.cu
//                             triton: kernels/add_relu.py
//                             used by: fusedres/functional.py (add_relu)
// conv_bias_relu              cpu: csrc/cpu/conv_bias_act.cpp   cuda: csrc/cuda/conv_bias_act.cu
// conv_bias_add_relu          triton: kernels/fused_conv2d.py (fused_conv2d, prologue off)
//                             used by: fusedres/functional.py (conv_bias_relu, conv_bias_add_relu)
// fold_conv_bn                cpu, cuda: csrc/composite/fold_conv_bn.cpp
//                             used by: fusedres/functional.py (fold_conv_bn), fusedres/convert.py
// (Triton only) fused_conv2d  triton: kernels/fused_conv2d.py
//                             used by: fusedres/functional.py (fused_conv2d)
//
// Tests: every op on every backend through the functional API (tests/test_batch_norm.py,
// test_add_relu.py, test_conv_bias_act.py, test_conv_triton.py), each raw op against its
// reference (tests/test_registration.py: opcheck, gradcheck, numbers), bad arguments to each
// raw op in every namespace (tests/test_op_contracts.py).
//
// This file is also the Python module `fusedres._C`: importing it loads the schemas and the
// CPU kernels into the dispatcher.
#include <Python.h>
#include <torch/library.h>

#include "library.h"

#ifndef FUSEDRES_CUDA_EMULATION  // the emulation module has its own (csrc/emulation)
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

FUSEDRES_LIBRARY_DEF(m) {
  // Per-channel mean and biased variance over every dim but 1, accumulated stably (Chan
  // merge of partial two-pass moments) in float (double for double inputs).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // sum = input + residual (rounded to input's dtype, as the add would be) and the statistics
  // of sum as batch_norm_stats, in one pass over input and residual.
  m.def(
      "add_batch_norm_stats(Tensor input, Tensor residual) -> (Tensor sum, Tensor mean, "
      "Tensor var)");

  // out = act((input - mean[c]) * scale[c] + shift[c] + r), where r is 0 without a residual,
  // the residual itself, or (residual - residual_mean[c]) * residual_scale[c] +
  // residual_shift[c] (the dual-BN form). act is ReLU when relu is true. The per-channel
  // vectors are float (double for double inputs); an absent shift is 0. Centering before
  // scaling keeps a large mean from cancelling the digits of a small variance.
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor scale, Tensor? shift, "
      "Tensor? residual, Tensor? residual_mean, Tensor? residual_scale, Tensor? residual_shift, "
      "bool relu) -> Tensor");

  // An eval BN as batch_norm_apply takes it: mean = running_mean, scale = weight /
  // sqrt(running_var + eps) (IEEE-rounded square root and division; weight 1 without one) and
  // shift = bias (0 without one), new tensors in float (double for double inputs), in one
  // launch. input: the BN's input, of which only the channels, dtype and device are used.
  // running_mean, running_var, weight and bias: C values of any floating dtype.
  m.def(
      "batch_norm_coefficients(Tensor input, Tensor running_mean, Tensor running_var, "
      "Tensor? weight, Tensor? bias, float eps) -> (Tensor mean, Tensor scale, Tensor shift)");

  // Training forward: batch statistics of input, then one normalize (+ residual) (+ ReLU)
  // pass. Returns the output, the batch mean and biased variance, and the coefficients the
  // normalize pass used, for the backward: invstd = 1 / sqrt(var + eps), scale = weight *
  // invstd, shift = bias (0 without one), all float (double for double inputs).
  // Running statistics, where given, are updated in place as nn.BatchNorm2d updates its own:
  // num_batches_tracked += 1; factor = momentum, or 1 / num_batches_tracked when momentum is
  // None; running_mean += factor * (mean - running_mean), running_var += factor * (var * M /
  // (M - 1) - running_var), M values a channel. An empty input is counted, nothing else.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "float eps, bool relu, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
      "Tensor(c!)? num_batches_tracked=None, float? momentum=0.1) -> (Tensor out, Tensor mean, "
      "Tensor var, Tensor invstd, Tensor scale, Tensor shift)");

  // Training forward of relu(bn1(input) + bn2(residual)): a projection shortcut. Returns the
  // output and each BN's batch mean, biased variance and invstd = 1 / sqrt(var + eps). Each
  // BN's running statistics as batch_norm_act_train's (residual_*: the second BN's).
  m.def(
      "dual_batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor residual, "
      "Tensor? residual_weight, Tensor? residual_bias, float eps, float residual_eps, bool relu, "
      "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
      "Tensor(c!)? num_batches_tracked=None, float? momentum=0.1, "
      "Tensor(d!)? residual_running_mean=None, Tensor(e!)? residual_running_var=None, "
      "Tensor(f!)? residual_num_batches_tracked=None, float? residual_momentum=0.1)"
      " -> (Tensor out, Tensor mean, Tensor var, Tensor invstd, Tensor residual_mean, "
      "Tensor residual_var, Tensor residual_invstd)");

  // Training forward of relu(bn(input + residual)) that also returns the sum (a
  // pre-activation block's output, which the next shortcut reads): sum, then the statistics
  // and the coefficients of batch_norm_act_train, for sum. Backward: the gradient of sum is
  // the one it gets directly plus the BN + ReLU's; input and residual both receive it.
  // Running statistics as batch_norm_act_train's.
  m.def(
      "add_batch_norm_act_train(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
      "float eps, bool relu, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, "
      "Tensor(c!)? num_batches_tracked=None, float? momentum=0.1) -> (Tensor out, Tensor sum, "
      "Tensor mean, Tensor var, Tensor invstd, Tensor scale, Tensor shift)");

  // Backward of training BN. g = grad_out, masked by the forward's ReLU: where output > 0 when
  // output is given; or, with scale instead, where the forward's output is > 0 as recomputed
  // from input: relu((input - mean) * scale + shift) rounded to input's dtype (no shift: 0),
  // so that the output is not read. Returns sum(g) and sum(g * xhat) per channel, i.e.
  // grad_bias and grad_weight, and with write_grad g itself in grad_out's dtype and input's
  // layout, written by the same pass (the gradient of a residual added before the ReLU, which
  // batch_norm_backward_input then reads unmasked); without it an empty tensor. With
  // grad_dtype also grad_weight = sum_dy_xhat and grad_bias = sum_dy in that dtype (a
  // bfloat16 model's parameter gradients, written by the same merge); else empty tensors.
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor? output, Tensor input, Tensor mean, "
      "Tensor invstd, bool write_grad=False, Tensor? scale=None, Tensor? shift=None, "
      "ScalarType? grad_dtype=None) -> (Tensor sum_dy, Tensor sum_dy_xhat, Tensor masked_grad, "
      "Tensor grad_weight, Tensor grad_bias)");
  // grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M), M values a channel,
  // plus extra_grad where given (a gradient the input also receives, e.g. the sum's own in
  // add_batch_norm_act_train's backward), added before the result is rounded to its dtype.
  m.def(
      "batch_norm_backward_input(Tensor grad_out, Tensor? output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xhat, Tensor? scale=None, "
      "Tensor? shift=None, Tensor? extra_grad=None) -> Tensor");

  // Backward of dual_batch_norm_act_train (relu(bn(input) + bn_r(residual))) in one reduce
  // and one input-gradient pass over (grad_out, output, input, residual): g = grad_out masked
  // where output <= 0 (no output: no ReLU); sum_dy = sum(g) is both BNs' bias gradient,
  // grad_weight = sum(g * xhat), grad_residual_weight = sum(g * rhat) (xhat, rhat each BN's
  // normalized value); grad_input and grad_residual as batch_norm_backward_input computes
  // each BN's. The parameters' gradients in grad_dtype / residual_grad_dtype, else float
  // (double for double inputs).
  m.def(
      "dual_batch_norm_backward(Tensor grad_out, Tensor? output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor residual, Tensor residual_mean, "
      "Tensor residual_invstd, Tensor? residual_weight, ScalarType? grad_dtype=None, "
      "ScalarType? residual_grad_dtype=None) -> (Tensor grad_input, Tensor grad_residual, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_residual_weight, "
      "Tensor grad_residual_bias)");

  // out = relu(input + residual): the residual epilogue on its own.
  m.def("add_relu(Tensor input, Tensor residual) -> Tensor");

  // Folded inference: relu(conv(input, weight) + bias) and relu(conv(input, weight) + bias +
  // residual).
  m.def(
      "conv_bias_relu(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
  m.def(
      "conv_bias_add_relu(Tensor input, Tensor weight, Tensor? bias, Tensor residual, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");

  // Folds an eval BN into the preceding convolution, in float (double for double weights):
  // weight' = weight * g / sqrt(v + eps), bias' = (bias - m) * g / sqrt(v + eps) + beta.
  m.def(
      "fold_conv_bn(Tensor conv_weight, Tensor? conv_bias, Tensor bn_running_mean, "
      "Tensor bn_running_var, float bn_eps, Tensor? bn_weight, Tensor? bn_bias) "
      "-> (Tensor weight, Tensor bias)");
}

// Statistics and backward kernels have no derivative of their own: autograd passes over them
// (their outputs never require grad). The differentiable ops get their formulas from
// fusedres/_ops.py.
FUSEDRES_LIBRARY_IMPL(Autograd, m) {
  m.impl("batch_norm_stats", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_backward_reduce", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_backward_input", torch::CppFunction::makeFallthrough());
  m.impl("dual_batch_norm_backward", torch::CppFunction::makeFallthrough());
}
