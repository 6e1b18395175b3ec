// CPU: out = act((input - mean[c]) * scale[c] + shift[c] + residual term), see normalize_act.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common.h"
#include "loops.h"
#include "normalize_act.h"

namespace fusedres::cpu {

using at::Tensor;

namespace {

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

void normalize_act(const Tensor& input, const NormalizeArgs& a, Tensor& out) {
  if (input.numel() == 0) return;
  const ChannelView v = channel_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "normalize_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = ptr_or_null<scalar_t>(a.residual);
    const acc_t* m = ptr_or_null<acc_t>(a.mean);
    const acc_t* s = ptr_or_null<acc_t>(a.scale);
    const acc_t* b = ptr_or_null<acc_t>(a.shift);
    const acc_t* rm = ptr_or_null<acc_t>(a.residual_mean);
    const acc_t* rs = ptr_or_null<acc_t>(a.residual_scale);
    const acc_t* rb = ptr_or_null<acc_t>(a.residual_shift);
    const bool relu = a.relu;
    scalar_t* y = out.data_ptr<scalar_t>();
    for_each_element(v, [&](int64_t i, int64_t c) {
      acc_t value = static_cast<acc_t>(x[i]);
      if (m) value -= m[c];
      if (s) value *= s[c];
      if (b) value += b[c];
      if (r) {
        acc_t rv = static_cast<acc_t>(r[i]);
        if (rm) rv -= rm[c];
        if (rs) rv *= rs[c];
        if (rb) rv += rb[c];
        value += rv;
      }
      // (value < 0) keeps NaN, as torch.relu does.
      if (relu && value < acc_t(0)) value = acc_t(0);
      y[i] = static_cast<scalar_t>(value);
    });
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
