// Op schemas of the fusedres library. Kernels are registered per dispatch key in csrc/cpu/
// and csrc/cuda/; fake (meta) kernels and autograd formulas in fusedres/_ops.py.
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

  // out = act((input - mean[c]) * scale[c] + shift[c] + r), where r is 0 without a residual,
  // the residual itself, or (residual - residual_mean[c]) * residual_scale[c] +
  // residual_shift[c] (the dual-BN form). act is ReLU when relu is true. The per-channel
  // vectors are float (double for double inputs); an absent shift is 0. Centering before
  // scaling keeps a large mean from cancelling the digits of a small variance.
  m.def(
      "batch_norm_apply(Tensor input, Tensor mean, Tensor scale, Tensor? shift, "
      "Tensor? residual, Tensor? residual_mean, Tensor? residual_scale, Tensor? residual_shift, "
      "bool relu) -> Tensor");

  // Training forward: batch statistics of input, then one normalize (+ residual) (+ ReLU)
  // pass. Returns the output and the batch mean and biased variance.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "float eps, bool relu) -> (Tensor out, Tensor mean, Tensor var)");

  // Training forward of relu(bn1(input) + bn2(residual)): a projection shortcut.
  m.def(
      "dual_batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor residual, "
      "Tensor? residual_weight, Tensor? residual_bias, float eps, float residual_eps, bool relu)"
      " -> (Tensor out, Tensor mean, Tensor var, Tensor residual_mean, Tensor residual_var)");

  // Backward of training BN. g = grad_out, masked by (output > 0) when output is given (the
  // ReLU mask, read from the saved output). Returns sum(g) and sum(g * xhat) per channel,
  // i.e. grad_bias and grad_weight.
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor? output, Tensor input, Tensor mean, "
      "Tensor invstd) -> (Tensor sum_dy, Tensor sum_dy_xhat)");
  // grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M), M values a channel.
  m.def(
      "batch_norm_backward_input(Tensor grad_out, Tensor? output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xhat) -> Tensor");

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
}
