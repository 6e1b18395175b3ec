// CPU: the training BN backward in two passes over (grad_out, output, input):
//   reduce: sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) per channel (and g itself, written
//           in the same pass, with write_grad)
//   input:  grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M)
// where g = grad_out, zeroed where the forward's output is <= 0 (the ReLU mask: read from the
// saved output, or recomputed from input with the forward's scale and shift), and xhat =
// (input - mean) * invstd.
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
  std::optional<Tensor> output, scale, shift;
};

BackwardArgs prepare(const Tensor& grad_out, const std::optional<Tensor>& output,
                     const Tensor& input_, const Tensor& mean, const Tensor& invstd,
                     const std::optional<Tensor>& scale, const std::optional<Tensor>& shift) {
  check_backward_args(grad_out, output, input_, mean, invstd, scale, shift);
  const Tensor input = dense_for_kernels(input_);
  return {match_layout(grad_out, input), input, match_layout(output, input), contiguous(scale),
          contiguous(shift)};
}

// Where the ReLU mask comes from: none, the saved output, or the output recomputed from x.
enum MaskKind { kNoMask, kOutputMask, kRecomputedMask };

// One channel's mask coefficients (kRecomputedMask): the forward's mean, scale, shift.
template <typename acc_t>
struct MaskCoefficients {
  acc_t m, s, b;
};

// The largest value that scalar_t's round-to-nearest-even conversion turns into 0: half its
// smallest subnormal for the 16-bit types, 0 for float and double.
template <typename scalar_t>
constexpr float kRoundsToZero = std::is_same_v<scalar_t, at::BFloat16> ? 0x1p-134f
                                : std::is_same_v<scalar_t, at::Half>   ? 0x1p-25f
                                                                       : 0.0f;

// Whether the ReLU blocks the gradient: where y <= 0 (it passes where !(y <= 0), NaN too, as
// threshold_backward), y the saved output or the forward's output recomputed from x by the
// forward's own expression, as it was stored in scalar_t: <= 0 there iff the value is at most
// kRoundsToZero (the same test as converting it, without the conversion, which the CPU does
// slowly for bfloat16).
template <int kMask, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline bool blocked(const scalar_t* y, int64_t i, acc_t x, MaskCoefficients<acc_t> k) {
  if constexpr (kMask == kOutputMask) return static_cast<acc_t>(y[i]) <= acc_t(0);
  if constexpr (kMask == kRecomputedMask) {
    const acc_t value = normalize_value<acc_t, false, true>(x, acc_t(0), k.m, k.s, k.b, 0, 1, 0);
    return value <= acc_t(kRoundsToZero<scalar_t>);
  }
  return false;
}

// g: grad_out where the ReLU passes it, else 0. dy is loaded unconditionally (and the test is
// written `blocked ? 0 : g`): other forms kept these loops from vectorising (7-12x slower).
template <int kMask, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t masked(const scalar_t* dy, const scalar_t* y, int64_t i, acc_t x,
                    MaskCoefficients<acc_t> k) {
  const acc_t g = static_cast<acc_t>(dy[i]);
  return blocked<kMask>(y, i, x, k) ? acc_t(0) : g;
}

// Stores g (grad_out's value where it passes the mask, else 0) by its bits: an integer select
// vectorises where converting the float g back to bfloat16 did not (7x slower).
template <int kMask, typename scalar_t, typename acc_t>
inline void store_masked(const scalar_t* dy, const scalar_t* y, scalar_t* out, int64_t i, acc_t x,
                         MaskCoefficients<acc_t> k) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  const bits_t d = reinterpret_cast<const bits_t*>(dy)[i];
  reinterpret_cast<bits_t*>(out)[i] = blocked<kMask>(y, i, x, k) ? bits_t(0) : d;
}

// Per-channel mask coefficients (mean, scale, shift; only read for kRecomputedMask).
template <typename acc_t>
struct MaskVectors {
  const acc_t* mean;
  std::vector<acc_t> scale, shift;
  MaskVectors(const acc_t* mean_, const std::optional<Tensor>& s, const std::optional<Tensor>& b,
              int64_t C)
      : mean(mean_), scale(C, acc_t(1)), shift(C, acc_t(0)) {
    if (s) std::copy_n(s->const_data_ptr<acc_t>(), C, scale.begin());
    if (b) std::copy_n(b->const_data_ptr<acc_t>(), C, shift.begin());
  }
  MaskCoefficients<acc_t> operator[](int64_t c) const { return {mean[c], scale[c], shift[c]}; }
};

// The reduce's sums over one channel's plane of n values. `omp simd` lets the compiler
// reorder the two sums into vector lanes; without it the ReLU mask's select kept this loop
// scalar (7x slower than unmasked on NCHW inputs). With kWrite, g is also stored to `out`
// (exact: g is grad_out's value or 0).
template <int kMask, bool kWrite, typename scalar_t, typename acc_t>
inline void reduce_plane(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                         const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                         MaskCoefficients<acc_t> k, int64_t n, acc_t& sum0, acc_t& sum1) {
  acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t g = masked<kMask>(dy, y, i, xi, k);
    if constexpr (kWrite) store_masked<kMask>(dy, y, out, i, xi, k);
    s0 += g;
    s1 += g * (xi - k.m);
  }
  sum0 += s0;
  sum1 += s1;
}

// The reduce's sums over one channels_last row of C values (channel c at offset c). Every
// pointer restrict-qualified: with the mask's three coefficient vectors the loop has more
// pointer pairs than the compiler checks for overlap at run time, and it was left scalar
// (12x slower) without.
template <int kMask, bool kWrite, typename scalar_t, typename acc_t>
inline void reduce_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                       const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       const acc_t* __restrict__ mu, const acc_t* __restrict__ sc,
                       const acc_t* __restrict__ sh, int64_t C, acc_t* __restrict__ acc0,
                       acc_t* __restrict__ acc1) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xi = static_cast<acc_t>(x[c]);
    const MaskCoefficients<acc_t> k{mu[c], sc[c], sh[c]};
    const acc_t g = masked<kMask>(dy, y, c, xi, k);
    if constexpr (kWrite) store_masked<kMask>(dy, y, out, c, xi, k);
    acc0[c] += g;
    acc1[c] += g * (xi - mu[c]);
  }
}

// Calls fn(std::bool_constant<flag>) for the runtime choice, so loops are branch-free.
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// Calls fn(std::integral_constant<int, MaskKind>) for the arguments' mask.
template <typename Fn>
void with_mask(const BackwardArgs& a, const Fn& fn) {
  if (a.output)
    fn(std::integral_constant<int, kOutputMask>{});
  else if (a.scale)
    fn(std::integral_constant<int, kRecomputedMask>{});
  else
    fn(std::integral_constant<int, kNoMask>{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_backward_reduce(
    const Tensor& grad_out_, const std::optional<Tensor>& output_, const Tensor& input_,
    const Tensor& mean_, const Tensor& invstd_, bool write_grad,
    const std::optional<Tensor>& scale_, const std::optional<Tensor>& shift_,
    std::optional<at::ScalarType> grad_dtype) {
  auto a = prepare(grad_out_, output_, input_, mean_, invstd_, scale_, shift_);
  check_grad_dtype(grad_dtype);
  const Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const int64_t C = a.input.size(1);
  Tensor sum_dy = at::empty({C}, mean.options());
  Tensor sum_dy_xhat = at::empty({C}, mean.options());
  Tensor masked_grad = write_grad ? at::empty_like(a.input) : at::empty({0}, a.input.options());
  auto [grad_weight, grad_bias] = empty_parameter_grads(sum_dy, grad_dtype);
  if (a.input.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    grad_weight.zero_();
    grad_bias.zero_();
    return {sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias};
  }
  const ChannelView v = channel_view(a.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
        const scalar_t* y = a.output ? a.output->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* x = a.input.const_data_ptr<scalar_t>();
        const MaskVectors<acc_t> k(mean.const_data_ptr<acc_t>(), a.scale, a.shift, C);
        scalar_t* out = write_grad ? masked_grad.data_ptr<scalar_t>() : nullptr;
        with_mask(a, [&](auto mask) {
          with_flag(write_grad, [&](auto write) {
            constexpr int kMask = decltype(mask)::value;
            constexpr bool kWrite = decltype(write)::value;
            // sum(g) and sum(g * (x - mean)); the latter is scaled by invstd once at the end.
            auto row = [&](int64_t offset, acc_t* acc0, acc_t* acc1) {
              reduce_row<kMask, kWrite>(dy + offset, kMask == kOutputMask ? y + offset : y,
                                        x + offset, kWrite ? out + offset : out, k.mean,
                                        k.scale.data(), k.shift.data(), C, acc0, acc1);
            };
            auto plane = [&](int64_t offset, int64_t n, int64_t c, acc_t& acc0, acc_t& acc1) {
              reduce_plane<kMask, kWrite>(dy + offset, kMask == kOutputMask ? y + offset : y,
                                          x + offset, kWrite ? out + offset : out, k[c], n, acc0,
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
      });
  if (grad_dtype) {  // (per-channel casts cost next to nothing on the CPU)
    grad_weight.copy_(sum_dy_xhat);
    grad_bias.copy_(sum_dy);
  }
  return {sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias};
}

Tensor batch_norm_backward_input(const Tensor& grad_out_, const std::optional<Tensor>& output_,
                                 const Tensor& input_, const Tensor& mean_, const Tensor& invstd_,
                                 const std::optional<Tensor>& weight_, const Tensor& sum_dy_,
                                 const Tensor& sum_dy_xhat_, const std::optional<Tensor>& scale_,
                                 const std::optional<Tensor>& shift_,
                                 const std::optional<Tensor>& extra_grad_) {
  auto a = prepare(grad_out_, output_, input_, mean_, invstd_, scale_, shift_);
  const auto acc = accumulate_type(a.input.scalar_type());
  check_channel_vector(sum_dy_, a.input, acc, "sum_dy");
  check_channel_vector(sum_dy_xhat_, a.input, acc, "sum_dy_xhat");
  check_affine(weight_, a.input, "weight");
  if (extra_grad_) check_same(*extra_grad_, input_, "extra_grad");
  const std::optional<Tensor> extra_grad = match_layout(extra_grad_, a.input);
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
        const MaskVectors<acc_t> mk(mean.const_data_ptr<acc_t>(), a.scale, a.shift, C);
        const acc_t* mu = mk.mean;
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        const scalar_t* e = extra_grad ? extra_grad->const_data_ptr<scalar_t>() : nullptr;
        with_mask(a, [&](auto mask) {
          with_flag(e != nullptr, [&](auto has_extra) {
            constexpr int kMask = decltype(mask)::value;
            constexpr bool kExtra = decltype(has_extra)::value;
            // + the extra gradient, before rounding
            auto extra = [&](int64_t i) { return kExtra ? static_cast<acc_t>(e[i]) : acc_t(0); };
            auto row = [&](int64_t offset) {
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = offset + c;
                const acc_t xi = static_cast<acc_t>(x[i]);
                const acc_t g = masked<kMask>(dy, y, i, xi, mk[c]);
                dx[i] = static_cast<scalar_t>(k[c] * (g - mean_dy[c] - (xi - mu[c]) * proj[c]) +
                                              extra(i));
              }
            };
            auto plane = [&](int64_t offset, int64_t n, int64_t c) {
              const acc_t kc = k[c], mc = mu[c], mdc = mean_dy[c], pc = proj[c];
              const MaskCoefficients<acc_t> mkc = mk[c];
              for (int64_t i = offset; i < offset + n; ++i) {
                const acc_t xi = static_cast<acc_t>(x[i]);
                const acc_t g = masked<kMask>(dy, y, i, xi, mkc);
                dx[i] = static_cast<scalar_t>(kc * (g - mdc - (xi - mc) * pc) + extra(i));
              }
            };
            for_each_run(v, row, plane);
          });
        });
      });
  return grad_input;
}

// The dual form's backward as the two BNs' reduce and input passes in turn (the CPU has no
// launches to save): the first reduce applies the ReLU mask and writes the masked gradient,
// which the other three read.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_batch_norm_backward(
    const Tensor& grad_out, const std::optional<Tensor>& output, const Tensor& input,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const Tensor& residual, const Tensor& residual_mean, const Tensor& residual_invstd,
    const std::optional<Tensor>& residual_weight, std::optional<at::ScalarType> grad_dtype,
    std::optional<at::ScalarType> residual_grad_dtype) {
  check_backward_args(grad_out, output, input, mean, invstd);
  check_dual_backward_args(input, weight, residual, residual_mean, residual_invstd, residual_weight,
                           grad_dtype, residual_grad_dtype);
  const bool relu = output.has_value();
  // (the shortcut's gradient comes out in input's layout, as the GPU's does)
  const Tensor r = match_layout(residual, dense_for_kernels(input));
  auto [sum_dy, sum_dy_xhat, masked, gw, gb] = batch_norm_backward_reduce(
      grad_out, output, input, mean, invstd, relu, std::nullopt, std::nullopt, std::nullopt);
  const Tensor g = relu ? masked : grad_out;
  Tensor grad_input =
      batch_norm_backward_input(g, std::nullopt, input, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                std::nullopt, std::nullopt, std::nullopt);
  auto [sum_dy_r, sum_dy_rhat, unused, rgw, rgb] =
      batch_norm_backward_reduce(g, std::nullopt, r, residual_mean, residual_invstd, false,
                                 std::nullopt, std::nullopt, std::nullopt);
  Tensor grad_residual =
      batch_norm_backward_input(g, std::nullopt, r, residual_mean, residual_invstd, residual_weight,
                                sum_dy_r, sum_dy_rhat, std::nullopt, std::nullopt, std::nullopt);
  auto as = [](const Tensor& t, std::optional<at::ScalarType> dtype) {
    return dtype ? t.to(*dtype) : t;
  };
  return {grad_input,
          grad_residual,
          as(sum_dy_xhat, grad_dtype),
          as(sum_dy, grad_dtype),
          as(sum_dy_rhat, residual_grad_dtype),
          as(sum_dy_r, residual_grad_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input);
  m.impl("dual_batch_norm_backward", &dual_batch_norm_backward);
}

}  // namespace fusedres::cpu
