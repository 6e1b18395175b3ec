// CPU: out = act((input - mean[c]) * scale[c] + shift[c] + residual term), see normalize_act.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common.h"
#include "loops.h"
#include "normalize_act.h"

namespace fusedres::cpu {

using at::Tensor;

namespace {

// A per-channel vector, or `channels` copies of its neutral value when absent, so the inner
// loops have no branches and vectorise.
template <typename acc_t>
struct ChannelValues {
  std::vector<acc_t> fallback;
  const acc_t* data;
  ChannelValues(const std::optional<Tensor>& t, int64_t channels, acc_t neutral) {
    if (t) {
      data = t->const_data_ptr<acc_t>();
    } else {
      fallback.assign(channels, neutral);
      data = fallback.data();
    }
  }
};

template <typename scalar_t, typename acc_t, bool kResidual, bool kRelu>
void normalize_kernel(const ChannelView& v, const scalar_t* x, const scalar_t* r,
                      const acc_t* m, const acc_t* s, const acc_t* b, const acc_t* rm,
                      const acc_t* rs, const acc_t* rb, scalar_t* y) {
  for_each_element(v, [&](int64_t i, int64_t c) {
    acc_t value = (static_cast<acc_t>(x[i]) - m[c]) * s[c] + b[c];
    if constexpr (kResidual) value += (static_cast<acc_t>(r[i]) - rm[c]) * rs[c] + rb[c];
    // (value < 0) keeps NaN, as torch.relu does.
    if constexpr (kRelu) value = value < acc_t(0) ? acc_t(0) : value;
    y[i] = static_cast<scalar_t>(value);
  });
}

}  // namespace

void normalize_act(const Tensor& input, const NormalizeArgs& a, Tensor& out) {
  if (input.numel() == 0) return;
  const ChannelView v = channel_view(input);
  const int64_t C = v.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelValues<acc_t> m(a.mean, C, 0), s(a.scale, C, 1), b(a.shift, C, 0);
    const ChannelValues<acc_t> rm(a.residual_mean, C, 0), rs(a.residual_scale, C, 1),
        rb(a.residual_shift, C, 0);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = out.data_ptr<scalar_t>();
    auto run = [&](auto residual, auto relu) {
      normalize_kernel<scalar_t, acc_t, decltype(residual)::value, decltype(relu)::value>(
          v, x, r, m.data, s.data, b.data, rm.data, rs.data, rb.data, y);
    };
    if (r && a.relu) run(std::true_type{}, std::true_type{});
    else if (r) run(std::true_type{}, std::false_type{});
    else if (a.relu) run(std::false_type{}, std::true_type{});
    else run(std::false_type{}, std::false_type{});
  });
}

namespace {

Tensor batch_norm_apply(const Tensor& input_, const Tensor& mean, const Tensor& scale,
                        const std::optional<Tensor>& shift, const std::optional<Tensor>& residual,
                        const std::optional<Tensor>& residual_mean,
                        const std::optional<Tensor>& residual_scale,
                        const std::optional<Tensor>& residual_shift, bool relu) {
  check_apply_args(input_, mean, scale, shift, residual, residual_mean, residual_scale,
                   residual_shift);
  const Tensor input = dense_for_kernels(input_);
  Tensor out = at::empty_like(input);
  normalize_act(input,
                {mean.contiguous(), scale.contiguous(), contiguous(shift),
                 match_layout(residual, input), contiguous(residual_mean),
                 contiguous(residual_scale), contiguous(residual_shift), relu},
                out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_apply", &batch_norm_apply);
}

}  // namespace fusedres::cpu
