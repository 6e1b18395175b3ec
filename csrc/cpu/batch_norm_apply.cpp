// CPU: the normalize pass (../normalize_act.h) and batch_norm_apply, its op; and
// batch_norm_coefficients, an eval BN's vectors for it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../normalize_act.h"
#include "loops.h"

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

// Restrict-qualified pointers let the compiler vectorise (out never aliases an input).
template <typename scalar_t, typename acc_t, bool kResidual, bool kRelu>
void normalize_kernel(const ChannelView& v, const scalar_t* __restrict__ x,
                      const scalar_t* __restrict__ r, const acc_t* __restrict__ m,
                      const acc_t* __restrict__ s, const acc_t* __restrict__ b,
                      const acc_t* __restrict__ rm, const acc_t* __restrict__ rs,
                      const acc_t* __restrict__ rb, scalar_t* __restrict__ y) {
  const int64_t C = v.channels;
  auto row = [=](int64_t offset) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t rv = kResidual ? static_cast<acc_t>(r[offset + c]) : acc_t(0);
      y[offset + c] = static_cast<scalar_t>(normalize_value<acc_t, kResidual, kRelu>(
          static_cast<acc_t>(x[offset + c]), rv, m[c], s[c], b[c], rm[c], rs[c], rb[c]));
    }
  };
  auto plane = [=](int64_t offset, int64_t n, int64_t c) {
    const acc_t mc = m[c], sc = s[c], bc = b[c], rmc = rm[c], rsc = rs[c], rbc = rb[c];
    for (int64_t i = offset; i < offset + n; ++i) {
      const acc_t rv = kResidual ? static_cast<acc_t>(r[i]) : acc_t(0);
      y[i] = static_cast<scalar_t>(normalize_value<acc_t, kResidual, kRelu>(
          static_cast<acc_t>(x[i]), rv, mc, sc, bc, rmc, rsc, rbc));
    }
  };
  for_each_run(v, row, plane);
}

}  // namespace

void normalize_act(const Tensor& input, const NormalizeArgs& a, Tensor& out) {
  if (input.numel() == 0) return;
  const ChannelView v = channel_view(input);
  const int64_t C = v.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "normalize_act", [&] {
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
        if (r && a.relu)
          run(std::true_type{}, std::true_type{});
        else if (r)
          run(std::true_type{}, std::false_type{});
        else if (a.relu)
          run(std::false_type{}, std::true_type{});
        else
          run(std::false_type{}, std::false_type{});
      });
}

namespace {

// A per-channel vector of a channel dtype (channel_parameter's), read as acc_t.
template <typename acc_t>
struct ChannelReader {
  const void* data;  // nullptr: none
  at::ScalarType type;
  acc_t absent;

  ChannelReader(const Tensor& t, acc_t absent_value)
      : data(t.defined() ? t.const_data_ptr() : nullptr),
        type(t.defined() ? t.scalar_type() : at::kFloat),
        absent(absent_value) {}

  acc_t operator[](int64_t c) const {
    if (data == nullptr) return absent;
    switch (type) {
      case at::kDouble:
        return static_cast<acc_t>(static_cast<const double*>(data)[c]);
      case at::kHalf:
        return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(data)[c]));
      case at::kBFloat16:
        return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(data)[c]));
      default:
        return static_cast<acc_t>(static_cast<const float*>(data)[c]);
    }
  }
};

}  // namespace

// (../normalize_act.h) One loop over the channels.
void coefficients(const CoefficientsArgs& a, Tensor& mean, Tensor& scale, Tensor& shift) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm_coefficients", [&] {
    using acc_t = scalar_t;
    const ChannelReader<acc_t> rm(a.running_mean, 0), rv(a.running_var, 0), w(a.weight, 1),
        b(a.bias, 0);
    const acc_t eps = static_cast<acc_t>(a.eps);
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* s = scale.data_ptr<acc_t>();
    acc_t* sh = shift.data_ptr<acc_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      m[c] = rm[c];
      s[c] = acc_t(1) / std::sqrt(rv[c] + eps) * w[c];
      sh[c] = b[c];
    }
  });
}

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("batch_norm_apply", &batch_norm_apply_op<normalize_act>);
  m.impl("batch_norm_coefficients", &batch_norm_coefficients_op<coefficients>);
}

}  // namespace fusedres::cpu
