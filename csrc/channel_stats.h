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

#include <optional>
#include <tuple>
#include <utility>

#include "common.h"

namespace fusedres {

// The BN coefficients a training forward normalises with, which the statistics pass writes
// too when asked (no per-channel ops after it): invstd = 1 / sqrt(var + eps), scale = weight *
// invstd (invstd without a weight) and shift = bias (0 without one). weight and bias, if
// given, are dense vectors of C values in float, double, half or bfloat16; the three outputs
// too, in the statistics' dtype.
//
// running: nn.BatchNorm2d's running statistics, which the same merge updates in place: the
// counter (num_batches_tracked) counts the batch, factor = momentum or, without one,
// 1 / counter; running_mean += factor * (mean - running_mean) and running_var += factor *
// (var * M / (M - 1) - running_var), M values a channel, each buffer in its own dtype. An
// empty input is counted but leaves the statistics as they are.
struct RunningStats {
  at::Tensor mean, var;  // undefined: none
  at::Tensor counter;    // one int64; undefined: none
  std::optional<double> momentum;
  int64_t count = 0;  // M
};

struct Coefficients {
  at::Tensor weight, bias;  // undefined: none
  double eps;
  at::Tensor invstd, scale, shift;
  RunningStats running;
};

// One tensor's statistics and BN coefficients, as a training forward computes them.
struct Statistics {
  at::Tensor mean, var;
  Coefficients coefficients;
};

// residual and sum: both nullptr, or both given. coefficients: nullptr, or also written.
// dual_channel_stats: the dual form's two BNs, of x and of z (dense, of one shape and layout),
// each with its coefficients: on a GPU one statistics kernel reads both and one merge writes
// both (three launches a dual forward, with the normalize).
namespace cpu {
void channel_stats(const at::Tensor& input, const at::Tensor* residual, at::Tensor* sum,
                   at::Tensor& mean, at::Tensor& var, Coefficients* coefficients);
void dual_channel_stats(const at::Tensor& x, const at::Tensor& z, Statistics& sx, Statistics& sz);
}  // namespace cpu
namespace cuda {
void channel_stats(const at::Tensor& input, const at::Tensor* residual, at::Tensor* sum,
                   at::Tensor& mean, at::Tensor& var, Coefficients* coefficients);
void dual_channel_stats(const at::Tensor& x, const at::Tensor& z, Statistics& sx, Statistics& sz);
}  // namespace cuda

// The coefficients (and the running statistics) from mean and var with ATen ops: the CPU's way
// (per-channel ops cost next to nothing there) and either device's for an empty input.
inline void coefficients_from(const at::Tensor& mean, const at::Tensor& var, Coefficients& c) {
  const at::Tensor invstd = var.add(c.eps).rsqrt();
  c.invstd.copy_(invstd);
  c.scale.copy_(c.weight.defined() ? invstd.mul(c.weight) : invstd);
  if (c.bias.defined())
    c.shift.copy_(c.bias);
  else
    c.shift.zero_();
  const RunningStats& r = c.running;
  if (r.counter.defined()) r.counter.add_(1);
  if (!r.mean.defined() || r.count == 0) return;
  const auto acc = var.scalar_type();
  const at::Tensor unbiased = var.mul(static_cast<double>(r.count) / (r.count - 1));
  for (auto [running, batch] : {std::pair{r.mean, mean}, std::pair{r.var, unbiased}}) {
    const at::Tensor value = running.to(acc);
    running.copy_(r.momentum ? value.lerp(batch, *r.momentum)
                             : value.lerp(batch, r.counter.to(acc).reciprocal().reshape({})));
  }
}

// Either device's channel_stats for an empty input: zero statistics, the coefficients, the
// batch counted and the running statistics left as they are. False if input has values.
inline bool statistics_of_empty(const at::Tensor& input, at::Tensor& mean, at::Tensor& var,
                                Coefficients* coefficients) {
  if (input.numel() != 0) return false;
  mean.zero_();
  var.zero_();
  if (coefficients) coefficients_from(mean, var, *coefficients);
  return true;
}

using StatsKernel = void (*)(const at::Tensor&, const at::Tensor*, at::Tensor*, at::Tensor&,
                             at::Tensor&, Coefficients*);
using DualStatsKernel = void (*)(const at::Tensor&, const at::Tensor&, Statistics&, Statistics&);

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
