// CUDA folded inference: cuDNN's fused convolution + bias (+ residual) + ReLU
// (at::cudnn_convolution_relu / at::cudnn_convolution_add_relu) where cuDNN has a fused engine
// for the case. Where it has none it throws ("GET was unable to find an engine": float64,
// float32 with TF32 off, some grouped or small shapes; always in the emulation build), and the
// convolution with its bias runs instead, followed by this library's own residual + ReLU pass
// (normalize_act, batch_norm_apply.cu). float64 goes there directly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common.h"
#include "../normalize_act.h"

namespace fusedres::cuda {
namespace {

using at::Tensor;

// cuDNN's fused epilogue takes the bias in the convolution's dtype.
std::optional<Tensor> bias_of_input_dtype(const ConvOperands& c) {
  if (!c.bias) return std::nullopt;
  return c.bias->to(c.input.scalar_type()).contiguous();
}

std::optional<Tensor> cudnn_fused(const ConvOperands& c, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  if (c.input.scalar_type() == at::kDouble) return std::nullopt;  // no fused engine
  try {
    if (c.residual)
      return at::cudnn_convolution_add_relu(c.input, c.weight, *c.residual, /*alpha=*/1.0,
                                            bias_of_input_dtype(c), stride, padding, dilation,
                                            groups);
    return at::cudnn_convolution_relu(c.input, c.weight, bias_of_input_dtype(c), stride, padding,
                                      dilation, groups);
  } catch (const c10::Error&) {
    return std::nullopt;  // no fused engine for this case
  }
}

Tensor conv_bias_act(const ConvOperands& c, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  if (auto fused = cudnn_fused(c, stride, padding, dilation, groups))
    return with_format_strides(*fused, c.format);
  const Tensor conv = dense_for_kernels(with_format_strides(
      at::convolution(c.input, c.weight, bias_of_input_dtype(c), stride, padding, dilation,
                      /*transposed=*/false, /*output_padding=*/{0, 0}, groups),
      c.format));
  Tensor out = at::empty_like(conv);
  normalize_act(conv, {.residual = match_layout(c.residual, conv), .relu = true}, out);
  return out;
}

Tensor conv_bias_relu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups) {
  return conv_bias_act(
      prepare_conv(input, weight, bias, std::nullopt, stride, padding, dilation, groups), stride,
      padding, dilation, groups);
}

Tensor conv_bias_add_relu(const Tensor& input, const Tensor& weight,
                          const std::optional<Tensor>& bias, const Tensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t groups) {
  return conv_bias_act(
      prepare_conv(input, weight, bias, residual, stride, padding, dilation, groups), stride,
      padding, dilation, groups);
}

}  // namespace

FUSEDRES_LIBRARY_IMPL(FUSEDRES_CUDA_KEY, m) {
  m.impl("conv_bias_relu", &conv_bias_relu);
  m.impl("conv_bias_add_relu", &conv_bias_add_relu);
}

}  // namespace fusedres::cuda
