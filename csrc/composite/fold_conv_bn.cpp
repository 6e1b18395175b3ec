// Folding an eval BatchNorm into the convolution before it. Plain ATen math on any device,
// differentiable through ATen's own autograd (CompositeImplicitAutograd).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"

namespace fusedres {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> fold_conv_bn(const Tensor& conv_weight,
                                        const std::optional<Tensor>& conv_bias,
                                        const Tensor& bn_running_mean, const Tensor& bn_running_var,
                                        double bn_eps, const std::optional<Tensor>& bn_weight,
                                        const std::optional<Tensor>& bn_bias) {
  TORCH_CHECK(conv_weight.dim() >= 3,
              "fusedres: conv_weight must have shape (C_out, C_in, k...), got ",
              conv_weight.sizes());
  TORCH_CHECK(at::isFloatingType(conv_weight.scalar_type()),
              "fusedres: conv_weight must be a floating point tensor, got ",
              conv_weight.scalar_type());
  TORCH_CHECK(bn_eps >= 0, "fusedres: bn_eps must be non-negative, got ", bn_eps);
  const int64_t c_out = conv_weight.size(0);
  auto check_vector = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == c_out, "fusedres: ", name, " must have shape (", c_out,
                ",) to match conv_weight's output channels, got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fusedres: ", name,
                " must be a floating point tensor, got ", t.scalar_type());
    TORCH_CHECK(t.device() == conv_weight.device(), "fusedres: ", name, " is on ", t.device(),
                " but conv_weight is on ", conv_weight.device());
  };
  check_vector(bn_running_mean, "bn_running_mean");
  check_vector(bn_running_var, "bn_running_var");
  if (conv_bias.has_value()) check_vector(*conv_bias, "conv_bias");
  if (bn_weight.has_value()) check_vector(*bn_weight, "bn_weight");
  if (bn_bias.has_value()) check_vector(*bn_bias, "bn_bias");

  const auto acc = accumulate_type(conv_weight.scalar_type());
  Tensor scale = bn_running_var.to(acc).add(bn_eps).rsqrt();
  if (bn_weight.has_value()) scale = scale.mul(bn_weight->to(acc));

  std::vector<int64_t> per_out_channel(conv_weight.dim(), 1);
  per_out_channel[0] = c_out;
  Tensor weight =
      conv_weight.to(acc).mul(scale.reshape(per_out_channel)).to(conv_weight.scalar_type());

  Tensor bias = bn_running_mean.to(acc).neg();
  if (conv_bias.has_value()) bias = bias.add(conv_bias->to(acc));
  bias = bias.mul(scale);
  if (bn_bias.has_value()) bias = bias.add(bn_bias->to(acc));
  // A conv without a bias gets one of the weight's dtype.
  bias = bias.to(conv_bias.has_value() ? conv_bias->scalar_type() : conv_weight.scalar_type());
  return {weight, bias};
}

}  // namespace

FUSEDRES_LIBRARY_IMPL(CompositeImplicitAutograd, m) { m.impl("fold_conv_bn", &fold_conv_bn); }

}  // namespace fusedres
