// CPU: per-channel mean and biased variance. Each run of values (a channel's H*W plane, or a
// block of channels_last rows) gets two-pass moments while it sits in cache, taken relative to
// the run's first value so a large mean does not swamp the sums; the runs are then combined
// with Chan's parallel formula, in double: a run's mean rounded to float would lose the digits
// of the variance that the shifted sums kept (a mean of 3e4 has a float ulp of 0.002).
// add_batch_norm_stats: the same statistics of input + residual, whose sum each run writes
// first (rounded to the dtype, as the add would be) and then reads back while it is in cache.
// Also the training forwards (../batch_norm_train.h) with these statistics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../batch_norm_train.h"
#include "../channel_stats.h"
#include "../common.h"
#include "loops.h"

namespace fusedres::cpu {
namespace {

using at::Tensor;

struct Moments {
  double count = 0, mean = 0, m2 = 0;  // m2: sum of squared deviations from mean

  void merge(const Moments& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    if (!std::isfinite(mean) || !std::isfinite(other.mean)) {
      // An Inf or NaN among the values: the mean as a sum would have it (Inf + x = Inf,
      // Inf - Inf = NaN) and the variance NaN, as PyTorch's batch norm gives.
      mean += other.mean;
      m2 = std::numeric_limits<double>::quiet_NaN();
      count += other.count;
      return;
    }
    const double total = count + other.count;
    const double delta = other.mean - mean;
    mean += delta * (other.count / total);
    m2 += other.m2 + delta * delta * (count * other.count / total);
    count = total;
  }
};

// The shift: a value near the mean, but never Inf / NaN (x - Inf would turn an Inf into NaN).
template <typename acc_t>
acc_t finite_or_zero(acc_t v) {
  return std::isfinite(v) ? v : acc_t(0);
}

// sum[i] = x[i] + z[i] for i in [begin, end), in the add's precision (opmath), rounded.
template <typename scalar_t, typename acc_t>
void add_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z,
             scalar_t* __restrict__ sum, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    sum[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + static_cast<acc_t>(z[i]));
}

// The statistics of x, or with z of x + z, which is written to sum_out.
template <typename scalar_t, typename acc_t>
void stats_channels_first(const ChannelView& v, const scalar_t* x, const scalar_t* z,
                          scalar_t* sum_out, acc_t* mean, acc_t* var) {
  at::parallel_for(0, v.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments total;
      for (int64_t o = 0; o < v.outer; ++o) {
        const int64_t first = (o * v.channels + c) * v.inner;
        if (z != nullptr) add_run<scalar_t, acc_t>(x, z, sum_out, first, first + v.inner);
        const scalar_t* run = (z != nullptr ? sum_out : x) + first;
        const acc_t shift = finite_or_zero(static_cast<acc_t>(run[0]));
        acc_t sum[1], m2[1];
        lane_sums<1>(
            0, v.inner, [&](int64_t i, acc_t* t) { t[0] = static_cast<acc_t>(run[i]) - shift; },
            sum);
        Moments part;
        part.count = static_cast<double>(v.inner);
        const acc_t offset = sum[0] / static_cast<acc_t>(v.inner);  // mean - shift
        lane_sums<1>(
            0, v.inner,
            [&](int64_t i, acc_t* t) {
              const acc_t d = static_cast<acc_t>(run[i]) - shift - offset;
              t[0] = d * d;
            },
            m2);
        part.m2 = m2[0];
        part.mean = static_cast<double>(shift) + static_cast<double>(offset);
        total.merge(part);
      }
      mean[c] = static_cast<acc_t>(total.mean);
      var[c] = static_cast<acc_t>(total.m2 / total.count);
    }
  });
}

template <typename scalar_t, typename acc_t>
void stats_channels_last(const ChannelView& v, const scalar_t* x_, const scalar_t* z,
                         scalar_t* sum_out, acc_t* mean, acc_t* var) {
  constexpr int64_t kRowsPerBlock = 128;
  const int64_t C = v.channels;
  const int64_t blocks = (v.outer + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<Moments> partial(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Moments* part = partial.data() + b * C;
      const int64_t row_begin = b * kRowsPerBlock;
      const int64_t row_end = std::min(v.outer, row_begin + kRowsPerBlock);
      const acc_t count = static_cast<acc_t>(row_end - row_begin);
      if (z != nullptr) add_run<scalar_t, acc_t>(x_, z, sum_out, row_begin * C, row_end * C);
      const scalar_t* x = z != nullptr ? sum_out : x_;
      std::vector<acc_t> shift(C);             // each channel's first value in the block
      std::vector<acc_t> offset(C, acc_t(0));  // mean - shift
      for (int64_t c = 0; c < C; ++c)
        shift[c] = finite_or_zero(static_cast<acc_t>(x[row_begin * C + c]));
      for (int64_t row = row_begin; row < row_end; ++row)
        for (int64_t c = 0; c < C; ++c) offset[c] += static_cast<acc_t>(x[row * C + c]) - shift[c];
      for (int64_t c = 0; c < C; ++c) offset[c] /= count;
      std::vector<acc_t> m2(C, acc_t(0));
      for (int64_t row = row_begin; row < row_end; ++row) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(x[row * C + c]) - shift[c] - offset[c];
          m2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        part[c].count = static_cast<double>(count);
        part[c].mean = static_cast<double>(shift[c]) + static_cast<double>(offset[c]);
        part[c].m2 = static_cast<double>(m2[c]);
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments total;
      for (int64_t b = 0; b < blocks; ++b) total.merge(partial[b * C + c]);
      mean[c] = static_cast<acc_t>(total.mean);
      var[c] = static_cast<acc_t>(total.m2 / total.count);
    }
  });
}

}  // namespace

// (../channel_stats.h)
void channel_stats(const Tensor& input, const Tensor* residual, Tensor* sum, Tensor& mean,
                   Tensor& var, Coefficients* coefficients) {
  if (statistics_of_empty(input, mean, var, coefficients)) return;
  const ChannelView v = channel_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* z = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
        scalar_t* s = sum ? sum->data_ptr<scalar_t>() : nullptr;
        if (v.inner == 1)
          stats_channels_last(v, x, z, s, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
        else
          stats_channels_first(v, x, z, s, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      });
  if (coefficients) coefficients_from(mean, var, *coefficients);
}

// (../channel_stats.h) Two passes: the CPU has no launches to save.
void dual_channel_stats(const Tensor& x, const Tensor& z, Statistics& sx, Statistics& sz) {
  channel_stats(x, nullptr, nullptr, sx.mean, sx.var, &sx.coefficients);
  channel_stats(z, nullptr, nullptr, sz.mean, sz.var, &sz.coefficients);
}

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_op<channel_stats>);
  m.impl("add_batch_norm_stats", &add_batch_norm_stats_op<channel_stats>);
  m.impl("batch_norm_act_train", &batch_norm_act_train<channel_stats>);
  m.impl("add_batch_norm_act_train", &add_batch_norm_act_train<channel_stats>);
  m.impl("dual_batch_norm_act_train", &dual_batch_norm_act_train<dual_channel_stats>);
}

}  // namespace fusedres::cpu
