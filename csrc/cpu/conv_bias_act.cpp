// CPU folded inference: the convolution with its bias (oneDNN adds it for free), then one
// epilogue pass adding the residual and applying ReLU (../normalize_act.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common.h"
#include "../normalize_act.h"

namespace fusedres::cpu {
namespace {

using at::Tensor;

Tensor conv_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& residual, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvOperands c =
      prepare_conv(input, weight, bias, residual, stride, padding, dilation, groups);
  std::optional<Tensor> bias_;
  if (c.bias) bias_ = c.bias->to(c.input.scalar_type());
  const Tensor conv = with_format_strides(
      at::convolution(c.input, c.weight, bias_, stride, padding, dilation,
                      /*transposed=*/false, /*output_padding=*/{0, 0}, groups),
      c.format);
  Tensor out = at::empty_like(conv);
  normalize_act(conv, {.residual = c.residual, .relu = true}, out);
  return out;
}

Tensor conv_bias_relu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups) {
  return conv_bias_act(input, weight, bias, std::nullopt, stride, padding, dilation, groups);
}

Tensor conv_bias_add_relu(const Tensor& input, const Tensor& weight,
                          const std::optional<Tensor>& bias, const Tensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  return conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("conv_bias_relu", &conv_bias_relu);
  m.impl("conv_bias_add_relu", &conv_bias_add_relu);
}

}  // namespace fusedres::cpu
