// Training-mode fused BN forwards, written once for both devices: one statistics pass that
// also writes the BN coefficients (../channel_stats.h: the device's channel_stats), then one
// normalize (+ residual) (+ ReLU) pass (the batch_norm_apply op). On a GPU that is three
// kernels and no per-channel ops between or after them: the statistics' merge also writes
// the coefficients and updates the running statistics. The autograd formula lives in
// fusedres/_ops.py; each device registers these with its own channel_stats (the dual form:
// dual_channel_stats, both BNs' statistics in the same two launches).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "channel_stats.h"
#include "common.h"

namespace fusedres {

using OptTensor = std::optional<at::Tensor>;

inline at::Tensor call_batch_norm_apply(const at::Tensor& input, const at::Tensor& mean,
                                        const at::Tensor& scale, const OptTensor& shift,
                                        const OptTensor& residual, const OptTensor& residual_mean,
                                        const OptTensor& residual_scale,
                                        const OptTensor& residual_shift, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(FUSEDRES_OP("batch_norm_apply"), "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, bool)>();
  return op.call(input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift,
                 relu);
}

inline void check_train_input(const at::Tensor& input, const char* name) {
  check_input(input, name);
  TORCH_CHECK(input.numel() == 0 || input.numel() / input.size(1) > 1,
              "Expected more than 1 value per channel when training, got ", name, " size ",
              input.sizes());
}

// nn.BatchNorm2d's running statistics as the op's arguments give them (checked), for the
// statistics pass to update (../channel_stats.h, RunningStats).
inline RunningStats running_stats(const at::Tensor& input, const OptTensor& running_mean,
                                  const OptTensor& running_var, const OptTensor& counter,
                                  std::optional<double> momentum, const std::string& prefix = "") {
  check_running_stats(running_mean, running_var, counter, momentum, input, prefix);
  return {running_mean.value_or(at::Tensor()), running_var.value_or(at::Tensor()),
          counter.value_or(at::Tensor()), momentum,
          input.numel() == 0 ? 0 : input.numel() / input.size(1)};
}

// Fresh tensors for x's statistics and coefficients (they are an op's outputs; the backward
// reuses the very coefficients: it recomputes the ReLU mask with them).
inline Statistics new_statistics(const at::Tensor& x, const OptTensor& weight,
                                 const OptTensor& bias, double eps, RunningStats running) {
  auto [mean, var] = empty_statistics(x);
  const auto acc = mean.scalar_type();
  Coefficients c{channel_parameter(weight, acc),
                 channel_parameter(bias, acc),
                 eps,
                 at::empty_like(mean),
                 at::empty_like(mean),
                 at::empty_like(mean),
                 std::move(running)};
  return {mean, var, std::move(c)};
}

// Statistics and coefficients of x (dense), of x + residual with `sum`. The running
// statistics are updated.
template <StatsKernel stats>
Statistics statistics(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      double eps, RunningStats running, const at::Tensor* residual = nullptr,
                      at::Tensor* sum = nullptr) {
  Statistics s = new_statistics(x, weight, bias, eps, std::move(running));
  stats(x, residual, sum, s.mean, s.var, &s.coefficients);
  return s;
}

template <StatsKernel stats>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_act_train(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& residual, double eps, bool relu,
                     const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  check_train_input(input, "input");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  if (residual.has_value()) check_same(*residual, input, "residual");
  RunningStats running =
      running_stats(input, running_mean, running_var, num_batches_tracked, momentum);
  const at::Tensor x = dense_for_kernels(input);
  auto [mean, var, c] = statistics<stats>(x, weight, bias, eps, std::move(running));
  at::Tensor out = call_batch_norm_apply(x, mean, c.scale, c.shift, residual, std::nullopt,
                                         std::nullopt, std::nullopt, relu);
  return {out, mean, var, c.invstd, c.scale, c.shift};
}

// relu(bn(input + residual)) and the sum: the statistics pass writes the sum, the normalize
// pass reads it (the sum is also the tensor the backward recomputes the ReLU mask from).
template <StatsKernel stats>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
add_batch_norm_act_train(const at::Tensor& input, const at::Tensor& residual_,
                         const OptTensor& weight, const OptTensor& bias, double eps, bool relu,
                         const OptTensor& running_mean, const OptTensor& running_var,
                         const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  check_train_input(input, "input");
  check_same(residual_, input, "residual");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  RunningStats running =
      running_stats(input, running_mean, running_var, num_batches_tracked, momentum);
  const at::Tensor x = dense_for_kernels(input);
  const at::Tensor residual = match_layout(residual_, x);
  at::Tensor sum = at::empty_like(x);
  auto [mean, var, c] =
      statistics<stats>(x, weight, bias, eps, std::move(running), &residual, &sum);
  at::Tensor out = call_batch_norm_apply(sum, mean, c.scale, c.shift, std::nullopt, std::nullopt,
                                         std::nullopt, std::nullopt, relu);
  return {out, sum, mean, var, c.invstd, c.scale, c.shift};
}

// The statistics of both BNs come from one call of dual_stats (one statistics launch and one
// merge on a GPU); the shortcut is read in input's layout.
template <DualStatsKernel dual_stats>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_batch_norm_act_train(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const at::Tensor& residual, const OptTensor& residual_weight,
                          const OptTensor& residual_bias, double eps, double residual_eps,
                          bool relu, const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, std::optional<double> momentum,
                          const OptTensor& residual_running_mean,
                          const OptTensor& residual_running_var,
                          const OptTensor& residual_num_batches_tracked,
                          std::optional<double> residual_momentum) {
  check_train_input(input, "input");
  check_same(residual, input, "residual");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
  check_affine(residual_weight, input, "residual_weight");
  check_affine(residual_bias, input, "residual_bias");
  RunningStats running =
      running_stats(input, running_mean, running_var, num_batches_tracked, momentum);
  RunningStats residual_running =
      running_stats(input, residual_running_mean, residual_running_var,
                    residual_num_batches_tracked, residual_momentum, "residual_");
  const at::Tensor x = dense_for_kernels(input);
  const at::Tensor z = match_layout(residual, x);
  Statistics sx = new_statistics(x, weight, bias, eps, std::move(running));
  Statistics sz =
      new_statistics(z, residual_weight, residual_bias, residual_eps, std::move(residual_running));
  dual_stats(x, z, sx, sz);
  auto& [mean, var, c] = sx;
  auto& [residual_mean, residual_var, r] = sz;
  at::Tensor out =
      call_batch_norm_apply(x, mean, c.scale, c.shift, z, residual_mean, r.scale, r.shift, relu);
  return {out, mean, var, c.invstd, residual_mean, residual_var, r.invstd};
}

}  // namespace fusedres
