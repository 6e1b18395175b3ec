// The statistics pass of each device, shared by batch_norm_stats and add_batch_norm_stats:
// per-channel mean and biased variance of input, or of input + residual, whose sum the same
// pass writes to `sum` (rounded to input's dtype, as the add would be). input, residual and
// sum are dense in input's layout; mean and var are float (double for double inputs).
//
// Also the host side of the two ops, written once for both devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "common.h"

namespace fusedres {

// The BN coefficients a training forward normalises with, which the statistics pass writes
// too when asked (no per-channel ops after it): invstd = 1 / sqrt(var + eps), scale = weight *
// invstd (invstd without a weight) and shift = bias (0 without one). weight and bias, if
// given, are dense vectors of C values in float, double, half or bfloat16; the three outputs
// too, in the statistics' dtype.
struct Coefficients {
  at::Tensor weight, bias;  // undefined: none
  double eps;
  at::Tensor invstd, scale, shift;
};

// residual and sum: both nullptr, or both given. coefficients: nullptr, or also written.
namespace cpu {
void channel_stats(const at::Tensor& input, const at::Tensor* residual, at::Tensor* sum,
                   at::Tensor& mean, at::Tensor& var, Coefficients* coefficients);
}
namespace cuda {
void channel_stats(const at::Tensor& input, const at::Tensor* residual, at::Tensor* sum,
                   at::Tensor& mean, at::Tensor& var, Coefficients* coefficients);
}

// The coefficients from var with ATen ops: the CPU's way (per-channel ops cost next to
// nothing there) and either device's for an empty input.
inline void coefficients_from(const at::Tensor& var, Coefficients& c) {
  const at::Tensor invstd = var.add(c.eps).rsqrt();
  c.invstd.copy_(invstd);
  c.scale.copy_(c.weight.defined() ? invstd.mul(c.weight) : invstd);
  if (c.bias.defined())
    c.shift.copy_(c.bias);
  else
    c.shift.zero_();
}

using StatsKernel = void (*)(const at::Tensor&, const at::Tensor*, at::Tensor*, at::Tensor&,
                             at::Tensor&, Coefficients*);

inline std::tuple<at::Tensor, at::Tensor> empty_statistics(const at::Tensor& input) {
  const auto options = input.options().dtype(accumulate_type(input.scalar_type()));
  return {at::empty({input.size(1)}, options), at::empty({input.size(1)}, options)};
}

template <StatsKernel kernel>
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_op(const at::Tensor& input_) {
  check_input(input_, "input");
  const at::Tensor input = dense_for_kernels(input_);
  auto [mean, var] = empty_statistics(input);
  kernel(input, nullptr, nullptr, mean, var, nullptr);
  return {mean, var};
}

template <StatsKernel kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_batch_norm_stats_op(
    const at::Tensor& input_, const at::Tensor& residual_) {
  check_input(input_, "input");
  check_same(residual_, input_, "residual");
  const at::Tensor input = dense_for_kernels(input_);
  const at::Tensor residual = match_layout(residual_, input);
  at::Tensor sum = at::empty_like(input);
  auto [mean, var] = empty_statistics(input);
  kernel(input, &residual, &sum, mean, var, nullptr);
  return {sum, mean, var};
}

}  // namespace fusedres
