// CPU folded inference: the convolution with its bias (oneDNN adds it for free), then the
// residual and the ReLU applied in place on the convolution's own (fresh) output by ATen's
// vectorised kernels: no second buffer, and faster on small tensors than a separate
// out-of-place pass. (oneDNN's fused ReLU post-op would be one pass less, but turns NaN into
// 0 and Inf into FLT_MAX, which torch.relu(conv(x) + r) does not.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include "../common.h"

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
  Tensor conv =
      with_format_strides(at::convolution(c.input, c.weight, bias_, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups),
                          c.format);
  Tensor out = conv;
  if (c.residual) out.add_(*c.residual);
  return out.relu_();
}

Tensor conv_bias_relu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups) {
  return conv_bias_act(input, weight, bias, std::nullopt, stride, padding, dilation, groups);
}

Tensor conv_bias_add_relu(const Tensor& input, const Tensor& weight,
                          const std::optional<Tensor>& bias, const Tensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t groups) {
  return conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("conv_bias_relu", &conv_bias_relu);
  m.impl("conv_bias_add_relu", &conv_bias_add_relu);
}

}  // namespace fusedres::cpu
