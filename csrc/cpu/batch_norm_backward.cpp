// CPU: the training BN backward in two passes over (grad_out, output, input):
//   reduce: sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) per channel
//   input:  grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M)
// where g = grad_out, zeroed where the saved output is <= 0 (the ReLU mask) when output is
// given, and xhat = (input - mean) * invstd.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../common.h"
#include "loops.h"

namespace fusedres::cpu {
namespace {

using at::Tensor;

// Checks the arguments both passes share and brings grad_out / output into input's layout.
struct BackwardArgs {
  Tensor grad_out, input;
  std::optional<Tensor> output;
};

BackwardArgs prepare(const Tensor& grad_out, const std::optional<Tensor>& output,
                     const Tensor& input_, const Tensor& mean, const Tensor& invstd) {
  check_backward_args(grad_out, output, input_, mean, invstd);
  const Tensor input = dense_for_kernels(input_);
  return {match_layout(grad_out, input), input, match_layout(output, input)};
}

// g: grad_out, with the ReLU mask of the saved output when kMasked. The gradient passes
// where !(y <= 0), as threshold_backward.
template <bool kMasked, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t masked(const scalar_t* dy, const scalar_t* y, int64_t i) {
  const acc_t g = static_cast<acc_t>(dy[i]);
  if constexpr (kMasked) return static_cast<acc_t>(y[i]) <= acc_t(0) ? acc_t(0) : g;
  return g;
}

// The reduce's sums over one channel's plane of n values. `omp simd` lets the compiler
// reorder the two sums into vector lanes; without it the ReLU mask's select kept this loop
// scalar (7x slower than unmasked on NCHW inputs).
template <bool kMasked, typename scalar_t, typename acc_t>
inline void reduce_plane(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                         const scalar_t* __restrict__ x, acc_t m, int64_t n, acc_t& sum0,
                         acc_t& sum1) {
  acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = masked<kMasked>(dy, y, i);
    s0 += g;
    s1 += g * (static_cast<acc_t>(x[i]) - m);
  }
  sum0 += s0;
  sum1 += s1;
}

// Calls fn(std::bool_constant<masked>) for the runtime choice, so loops are branch-free.
template <typename Fn>
void with_mask(bool masked, const Fn& fn) {
  if (masked)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out_,
                                                      const std::optional<Tensor>& output_,
                                                      const Tensor& input_, const Tensor& mean_,
                                                      const Tensor& invstd_) {
  auto a = prepare(grad_out_, output_, input_, mean_, invstd_);
  const Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const int64_t C = a.input.size(1);
  Tensor sum_dy = at::empty({C}, mean.options());
  Tensor sum_dy_xhat = at::empty({C}, mean.options());
  if (a.input.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    return {sum_dy, sum_dy_xhat};
  }
  const ChannelView v = channel_view(a.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
        const scalar_t* y = a.output ? a.output->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* x = a.input.const_data_ptr<scalar_t>();
        const acc_t* mu = mean.const_data_ptr<acc_t>();
        with_mask(y != nullptr, [&](auto mask) {
          constexpr bool kMasked = decltype(mask)::value;
          // sum(g) and sum(g * (x - mean)); the latter is scaled by invstd once at the end.
          auto row = [&](int64_t offset, acc_t* acc0, acc_t* acc1) {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t g = masked<kMasked>(dy, y, offset + c);
              acc0[c] += g;
              acc1[c] += g * (static_cast<acc_t>(x[offset + c]) - mu[c]);
            }
          };
          auto plane = [&](int64_t offset, int64_t n, int64_t c, acc_t& acc0, acc_t& acc1) {
            reduce_plane<kMasked>(dy + offset, kMasked ? y + offset : y, x + offset, mu[c], n, acc0,
                                  acc1);
          };
          auto [s0, s1] = per_channel_sums<acc_t>(v, row, plane);
          const acc_t* is = invstd.const_data_ptr<acc_t>();
          for (int64_t c = 0; c < C; ++c) {
            sum_dy.data_ptr<acc_t>()[c] = s0[c];
            sum_dy_xhat.data_ptr<acc_t>()[c] = s1[c] * is[c];
          }
        });
      });
  return {sum_dy, sum_dy_xhat};
}

Tensor batch_norm_backward_input(const Tensor& grad_out_, const std::optional<Tensor>& output_,
                                 const Tensor& input_, const Tensor& mean_, const Tensor& invstd_,
                                 const std::optional<Tensor>& weight_, const Tensor& sum_dy_,
                                 const Tensor& sum_dy_xhat_) {
  auto a = prepare(grad_out_, output_, input_, mean_, invstd_);
  const auto acc = accumulate_type(a.input.scalar_type());
  check_channel_vector(sum_dy_, a.input, acc, "sum_dy");
  check_channel_vector(sum_dy_xhat_, a.input, acc, "sum_dy_xhat");
  check_affine(weight_, a.input, "weight");
  Tensor grad_input = at::empty_like(a.input);
  if (a.input.numel() == 0) return grad_input;
  const ChannelView v = channel_view(a.input);
  const int64_t C = v.channels;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_input", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Per channel: grad_input = k * (g - mean_dy - (x - mean) * proj)
        const Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
        const Tensor sum_dy = sum_dy_.contiguous(), sum_dy_xhat = sum_dy_xhat_.contiguous();
        const Tensor weight = weight_ ? weight_->to(acc).contiguous() : Tensor();
        const acc_t inv_m = acc_t(1) / static_cast<acc_t>(v.per_channel());
        std::vector<acc_t> k(C), mean_dy(C), proj(C);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t is = invstd.const_data_ptr<acc_t>()[c];
          const acc_t w = weight.defined() ? weight.const_data_ptr<acc_t>()[c] : acc_t(1);
          k[c] = w * is;
          mean_dy[c] = sum_dy.const_data_ptr<acc_t>()[c] * inv_m;
          proj[c] = sum_dy_xhat.const_data_ptr<acc_t>()[c] * inv_m * is;
        }
        const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
        const scalar_t* y = a.output ? a.output->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* x = a.input.const_data_ptr<scalar_t>();
        const acc_t* mu = mean.const_data_ptr<acc_t>();
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        with_mask(y != nullptr, [&](auto mask) {
          constexpr bool kMasked = decltype(mask)::value;
          auto row = [&](int64_t offset) {
            for (int64_t c = 0; c < C; ++c) {
              const int64_t i = offset + c;
              const acc_t g = masked<kMasked>(dy, y, i);
              const acc_t centered = static_cast<acc_t>(x[i]) - mu[c];
              dx[i] = static_cast<scalar_t>(k[c] * (g - mean_dy[c] - centered * proj[c]));
            }
          };
          auto plane = [&](int64_t offset, int64_t n, int64_t c) {
            const acc_t kc = k[c], mc = mu[c], mdc = mean_dy[c], pc = proj[c];
            for (int64_t i = offset; i < offset + n; ++i) {
              const acc_t g = masked<kMasked>(dy, y, i);
              dx[i] = static_cast<scalar_t>(kc * (g - mdc - (static_cast<acc_t>(x[i]) - mc) * pc));
            }
          };
          for_each_run(v, row, plane);
        });
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input);
}

}  // namespace fusedres::cpu
