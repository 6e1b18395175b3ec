// The one elementwise pass of each device, shared by batch_norm_apply, add_relu and the CPU
// conv epilogue:
//   out = act((input - mean[c]) * scale[c] + shift[c]
//             + (residual - residual_mean[c]) * residual_scale[c] + residual_shift[c])
// An absent mean / shift / residual_mean / residual_shift is 0, an absent scale /
// residual_scale is 1, an absent residual means no residual term. Tensors are dense in input's
// layout (the per-channel vectors contiguous, float / double); out must not alias an input.
//
// Also the host side of the two ops built on it, written once for both devices, and of
// batch_norm_coefficients, which gives an eval BN's vectors for it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace fusedres {

struct NormalizeArgs {
  std::optional<at::Tensor> mean, scale, shift;
  std::optional<at::Tensor> residual, residual_mean, residual_scale, residual_shift;
  bool relu = false;
};

namespace cpu {
void normalize_act(const at::Tensor& input, const NormalizeArgs& args, at::Tensor& out);
}
namespace cuda {
void normalize_act(const at::Tensor& input, const NormalizeArgs& args, at::Tensor& out);
}

using NormalizeKernel = void (*)(const at::Tensor&, const NormalizeArgs&, at::Tensor&);

template <NormalizeKernel kernel>
at::Tensor batch_norm_apply_op(const at::Tensor& input_, const at::Tensor& mean,
                               const at::Tensor& scale, const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& residual_mean,
                               const std::optional<at::Tensor>& residual_scale,
                               const std::optional<at::Tensor>& residual_shift, bool relu) {
  check_apply_args(input_, mean, scale, shift, residual, residual_mean, residual_scale,
                   residual_shift);
  const at::Tensor input = dense_for_kernels(input_);
  at::Tensor out = at::empty_like(input);
  kernel(input,
         {mean.contiguous(), scale.contiguous(), contiguous(shift), match_layout(residual, input),
          contiguous(residual_mean), contiguous(residual_scale), contiguous(residual_shift), relu},
         out);
  return out;
}

template <NormalizeKernel kernel>
at::Tensor add_relu_op(const at::Tensor& input_, const at::Tensor& residual) {
  check_input(input_, "input");
  check_same(residual, input_, "residual");
  const at::Tensor input = dense_for_kernels(input_);
  at::Tensor out = at::empty_like(input);
  kernel(input, {.residual = match_layout(residual, input), .relu = true}, out);
  return out;
}

// batch_norm_coefficients: an eval BN's mean, scale = weight / sqrt(running_var + eps) and
// shift = bias (C values each, in the statistics' dtype) from its vectors as
// channel_parameter gives them (weight / bias undefined: none), in one kernel.
struct CoefficientsArgs {
  at::Tensor running_mean, running_var, weight, bias;
  double eps;
};

namespace cpu {
void coefficients(const CoefficientsArgs& args, at::Tensor& mean, at::Tensor& scale,
                  at::Tensor& shift);
}
namespace cuda {
void coefficients(const CoefficientsArgs& args, at::Tensor& mean, at::Tensor& scale,
                  at::Tensor& shift);
}

using CoefficientsKernel = void (*)(const CoefficientsArgs&, at::Tensor&, at::Tensor&, at::Tensor&);

template <CoefficientsKernel kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_coefficients_op(
    const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_coefficients_args(input, running_mean, running_var, weight, bias);
  const auto acc = accumulate_type(input.scalar_type());
  at::Tensor mean = at::empty({input.size(1)}, running_mean.options().dtype(acc));
  at::Tensor scale = at::empty_like(mean), shift = at::empty_like(mean);
  if (mean.numel() > 0)
    kernel({channel_parameter(running_mean, acc), channel_parameter(running_var, acc),
            channel_parameter(weight, acc), channel_parameter(bias, acc), eps},
           mean, scale, shift);
  return {mean, scale, shift};
}

}  // namespace fusedres
