// CUDA folded inference: cuDNN's fused convolution + bias (+ residual) + ReLU
// (at::cudnn_convolution_relu / at::cudnn_convolution_add_relu, which fall back to separate
// ATen ops when cuDNN has no fused engine for the shape).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <torch/library.h>

#include "../common.h"

namespace fusedres::cuda {
namespace {

using at::Tensor;

// cuDNN's fused epilogue takes the bias in the convolution's dtype.
std::optional<Tensor> bias_of_input_dtype(const ConvOperands& c) {
  if (!c.bias) return std::nullopt;
  return c.bias->to(c.input.scalar_type()).contiguous();
}

Tensor conv_bias_relu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups) {
  const ConvOperands c =
      prepare_conv(input, weight, bias, std::nullopt, stride, padding, dilation, groups);
  return with_format_strides(at::cudnn_convolution_relu(c.input, c.weight, bias_of_input_dtype(c),
                                                        stride, padding, dilation, groups),
                             c.format);
}

Tensor conv_bias_add_relu(const Tensor& input, const Tensor& weight,
                          const std::optional<Tensor>& bias, const Tensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  const ConvOperands c =
      prepare_conv(input, weight, bias, residual, stride, padding, dilation, groups);
  return with_format_strides(
      at::cudnn_convolution_add_relu(c.input, c.weight, *c.residual, /*alpha=*/1.0,
                                     bias_of_input_dtype(c), stride, padding, dilation, groups),
      c.format);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("conv_bias_relu", &conv_bias_relu);
  m.impl("conv_bias_add_relu", &conv_bias_add_relu);
}

}  // namespace fusedres::cuda
