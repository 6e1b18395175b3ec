// The one elementwise pass of the CPU backend, shared by batch_norm_apply, add_relu and the
// conv epilogues:
//   out = act((input - mean[c]) * scale[c] + shift[c]
//             + (residual - residual_mean[c]) * residual_scale[c] + residual_shift[c])
// An absent mean / shift / residual_mean / residual_shift is 0, an absent scale /
// residual_scale is 1, an absent residual means no residual term. `out` must not alias an
// input.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedres::cpu {

struct NormalizeArgs {
  std::optional<at::Tensor> mean, scale, shift;
  std::optional<at::Tensor> residual, residual_mean, residual_scale, residual_shift;
  bool relu = false;
};

void normalize_act(const at::Tensor& input, const NormalizeArgs& args, at::Tensor& out);

}  // namespace fusedres::cpu
