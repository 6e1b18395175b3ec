// Training-mode fused BN forwards, written once for every device: batch statistics, then one
// normalize (+ residual) (+ ReLU) pass. The two kernels they call are registered per device
// in cpu/ and cuda/; the autograd formula lives in fusedres/_ops.py.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"

namespace fusedres {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> call_batch_norm_stats(const Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(FUSEDRES_OP("batch_norm_stats"), "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&)>();
  return op.call(input);
}

std::tuple<Tensor, Tensor, Tensor> call_add_batch_norm_stats(const Tensor& input,
                                                             const Tensor& residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(FUSEDRES_OP("add_batch_norm_stats"), "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&)>();
  return op.call(input, residual);
}

using OptTensor = std::optional<Tensor>;

Tensor call_batch_norm_apply(const Tensor& input, const Tensor& mean, const Tensor& scale,
                             const OptTensor& shift, const OptTensor& residual,
                             const OptTensor& residual_mean, const OptTensor& residual_scale,
                             const OptTensor& residual_shift, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(FUSEDRES_OP("batch_norm_apply"), "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, bool)>();
  return op.call(input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift,
                 relu);
}

void check_train_input(const Tensor& input, const char* name) {
  check_input(input, name);
  TORCH_CHECK(input.numel() == 0 || input.numel() / input.size(1) > 1,
              "Expected more than 1 value per channel when training, got ", name, " size ",
              input.sizes());
}

// out = (x - mean) * scale + shift with invstd = 1 / sqrt(var + eps), scale = weight * invstd
// (invstd itself without a weight), shift = bias (absent without one), in the statistics'
// dtype. fresh: scale and shift never alias invstd or the bias (for an op's outputs).
struct Coefficients {
  Tensor invstd, scale;
  OptTensor shift;
};

Coefficients coefficients(const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                          double eps, bool fresh = false) {
  Tensor invstd = var.add(eps).rsqrt();
  Tensor scale =
      weight ? invstd.mul(weight->to(invstd.scalar_type())) : (fresh ? invstd.clone() : invstd);
  OptTensor shift;
  if (bias) shift = bias->to(var.scalar_type(), /*non_blocking=*/false, /*copy=*/fresh);
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_act_train(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& residual, double eps, bool relu) {
  check_train_input(input, "input");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  if (residual.has_value()) check_same(*residual, input, "residual");
  auto [mean, var] = call_batch_norm_stats(input);
  // The backward reuses these exact coefficients (the ReLU mask is recomputed with them).
  const Coefficients c = coefficients(var, weight, bias, eps, /*fresh=*/true);
  const Tensor shift = c.shift ? *c.shift : at::zeros_like(var);
  Tensor out = call_batch_norm_apply(input, mean, c.scale, shift, residual, std::nullopt,
                                     std::nullopt, std::nullopt, relu);
  return {out, mean, var, c.invstd, c.scale, shift};
}

// relu(bn(input + residual)) and the sum: the statistics pass writes the sum, the normalize
// pass reads it (the sum is also the tensor the backward recomputes the ReLU mask from).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> add_batch_norm_act_train(
    const Tensor& input, const Tensor& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, bool relu) {
  check_train_input(input, "input");
  check_same(residual, input, "residual");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  auto [sum, mean, var] = call_add_batch_norm_stats(input, residual);
  const Coefficients c = coefficients(var, weight, bias, eps, /*fresh=*/true);
  const Tensor shift = c.shift ? *c.shift : at::zeros_like(var);
  Tensor out = call_batch_norm_apply(sum, mean, c.scale, shift, std::nullopt, std::nullopt,
                                     std::nullopt, std::nullopt, relu);
  return {out, sum, mean, var, c.invstd, c.scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_batch_norm_act_train(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& residual, const std::optional<Tensor>& residual_weight,
    const std::optional<Tensor>& residual_bias, double eps, double residual_eps, bool relu) {
  check_train_input(input, "input");
  check_same(residual, input, "residual");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  check_affine(residual_weight, input, "residual_weight");
  check_affine(residual_bias, input, "residual_bias");
  auto [mean, var] = call_batch_norm_stats(input);
  auto [residual_mean, residual_var] = call_batch_norm_stats(residual);
  const Coefficients c = coefficients(var, weight, bias, eps);
  const Coefficients r = coefficients(residual_var, residual_weight, residual_bias, residual_eps);
  Tensor out = call_batch_norm_apply(input, mean, c.scale, c.shift, residual, residual_mean,
                                     r.scale, r.shift, relu);
  return {out, mean, var, c.invstd, residual_mean, residual_var, r.invstd};
}

}  // namespace

FUSEDRES_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("batch_norm_act_train", &batch_norm_act_train);
  m.impl("dual_batch_norm_act_train", &dual_batch_norm_act_train);
  m.impl("add_batch_norm_act_train", &add_batch_norm_act_train);
}

}  // namespace fusedres
