// Shared by the CPU and CUDA kernels: how a (N, C, *spatial) tensor is laid out in memory,
// and the argument checks every op runs before any kernel is launched.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>
#include <c10/util/strides.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "library.h"

namespace fusedres {

// Every kernel sees a dense tensor as (outer, channels, inner): element (o, c, i) lives at
// ((o * channels) + c) * inner + i.
//   NCHW-contiguous:  outer = N,       inner = H * W   (a channel is a run of `inner` values)
//   channels_last:    outer = N * H*W, inner = 1       (a row of C values per pixel)
struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  int64_t numel() const { return outer * channels * inner; }
  // Number of values that share one channel (the BN reduction size).
  int64_t per_channel() const { return outer * inner; }
};

// Dense in channels_last order. Also true for some NCHW-contiguous tensors (H = W = 1, or
// C = 1), whose memory is then identical in both orders: a density test, not a layout choice
// (conv_output_format makes that).
inline bool is_channels_last(const at::Tensor& t) {
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// The kernels read NCHW-contiguous or channels_last tensors; anything else is copied once.
inline at::Tensor dense_for_kernels(const at::Tensor& t) {
  if (t.is_contiguous() || is_channels_last(t)) return t;
  return t.contiguous();
}

inline ChannelView channel_view(const at::Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1);
  const int64_t spatial = (n * c == 0) ? 0 : t.numel() / (n * c);
  if (t.is_contiguous()) return {n, c, spatial};
  TORCH_INTERNAL_ASSERT(is_channels_last(t), "fusedres: tensor is not dense");
  return {n * spatial, c, 1};
}

// Brings `t` (same shape as `like`) into the memory layout of `like`, copying only if needed,
// so both can be indexed with one ChannelView.
inline at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like) {
  if (like.is_contiguous()) return t.contiguous();
  if (like.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
  return t.contiguous(at::MemoryFormat::ChannelsLast3d);
}

inline std::optional<at::Tensor> match_layout(const std::optional<at::Tensor>& t,
                                              const at::Tensor& like) {
  if (!t.has_value()) return std::nullopt;
  return match_layout(*t, like);
}

inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "fusedres: ", name, " must have shape (N, C, ...), got ", x.dim(),
              " dimension(s)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fusedres: ", name,
              " must be a floating point tensor, got ", x.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fusedres: ", name, " must have the shape of input ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fusedres: ", name,
              " must have the dtype of input (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fusedres: ", name, " is on ", t.device(),
              " but input is on ", x.device());
}

// Per-channel vectors (scale, shift, mean, weight ...): `channels` values of dtype `dtype`.
inline void check_channel_vector(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                                 const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "fusedres: ", name, " must have shape (",
              x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fusedres: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fusedres: ", name, " is on ", t.device(),
              " but input is on ", x.device());
}

// An optional BN weight or bias: one value per channel, of any floating dtype (the kernels
// convert it), on input's device (a kernel would otherwise read a host pointer).
inline void check_affine(const std::optional<at::Tensor>& t, const at::Tensor& input,
                         const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), "fusedres: ", name,
              " must have shape (", input.size(1), ",), got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fusedres: ", name,
              " must be a floating point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), "fusedres: ", name, " is on ", t->device(),
              " but input is on ", input.device());
}

// The dtypes the kernels read and write per-channel vectors in as they are (ChannelParam /
// ChannelBuffer of cuda/utils.cuh, the Triton kernels' pointers).
inline bool is_channel_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// nn.BatchNorm2d's running statistics, which a training forward updates in place: both or
// neither of running_mean / running_var (C contiguous values of float, double, half or
// bfloat16, on input's device: the kernels write them where they are), the batch counter
// num_batches_tracked (one int64 on input's device), and momentum None (a cumulative average)
// only with the counter. prefix: "" or "residual_" (the dual form's second BN).
inline void check_running_stats(const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& counter,
                                std::optional<double> momentum, const at::Tensor& input,
                                const std::string& prefix) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "fusedres: ", prefix,
              "running_mean and ", prefix, "running_var must both be given or both be None");
  for (const auto& [t, name] :
       {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    check_affine(*t, input, (prefix + name).c_str());
    if (!t->has_value()) continue;
    TORCH_CHECK(is_channel_dtype((*t)->scalar_type()), "fusedres: ", prefix, name,
                " must be Float, Double, Half or BFloat16, got ", (*t)->scalar_type());
    TORCH_CHECK((*t)->is_contiguous(), "fusedres: ", prefix, name,
                " must be contiguous (it is updated in place)");
  }
  if (counter) {
    TORCH_CHECK(counter->numel() == 1, "fusedres: ", prefix,
                "num_batches_tracked must have one element (a counter), got shape ",
                counter->sizes());
    TORCH_CHECK(counter->scalar_type() == at::kLong, "fusedres: ", prefix,
                "num_batches_tracked must be Long, got ", counter->scalar_type());
    TORCH_CHECK(counter->device() == input.device(), "fusedres: ", prefix,
                "num_batches_tracked is on ", counter->device(), " but input is on ",
                input.device());
  }
  TORCH_CHECK(momentum || !running_mean || counter, "fusedres: ", prefix,
              "momentum=None (a cumulative average) needs ", prefix, "num_batches_tracked");
}

// Statistics and per-channel parameters of the kernels are kept in this type: float for
// half / bfloat16 / float inputs, double for double inputs.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A BN's weight or bias as the kernels read it: in its own dtype when that is float, double,
// half or bfloat16 (a bfloat16 model's BN costs no casts), else cast to the statistics' dtype.
inline at::Tensor channel_parameter(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t) return at::Tensor();
  return (is_channel_dtype(t->scalar_type()) ? *t : t->to(acc)).contiguous();
}

// The parameters' gradients of batch_norm_backward_reduce: a floating dtype, or none.
inline void check_grad_dtype(std::optional<at::ScalarType> grad_dtype,
                             const char* name = "grad_dtype") {
  TORCH_CHECK(!grad_dtype || at::isFloatingType(*grad_dtype), "fusedres: ", name,
              " must be a floating point type, got ", *grad_dtype);
}

// grad_weight and grad_bias of batch_norm_backward_reduce: empty without grad_dtype.
inline std::tuple<at::Tensor, at::Tensor> empty_parameter_grads(
    const at::Tensor& sums, std::optional<at::ScalarType> grad_dtype) {
  const auto options = sums.options().dtype(grad_dtype.value_or(sums.scalar_type()));
  const int64_t n = grad_dtype ? sums.size(0) : 0;
  return {at::empty({n}, options), at::empty({n}, options)};
}

// The arguments of dual_batch_norm_backward beyond those check_backward_args checks.
inline void check_dual_backward_args(const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& residual, const at::Tensor& residual_mean,
                                     const at::Tensor& residual_invstd,
                                     const std::optional<at::Tensor>& residual_weight,
                                     std::optional<at::ScalarType> grad_dtype,
                                     std::optional<at::ScalarType> residual_grad_dtype) {
  check_same(residual, input, "residual");
  const auto acc = accumulate_type(input.scalar_type());
  check_channel_vector(residual_mean, input, acc, "residual_mean");
  check_channel_vector(residual_invstd, input, acc, "residual_invstd");
  check_affine(weight, input, "weight");
  check_affine(residual_weight, input, "residual_weight");
  check_grad_dtype(grad_dtype);
  check_grad_dtype(residual_grad_dtype, "residual_grad_dtype");
}

// Arguments of batch_norm_apply, checked before any kernel runs.
inline void check_apply_args(const at::Tensor& input, const at::Tensor& mean,
                             const at::Tensor& scale, const std::optional<at::Tensor>& shift,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_mean,
                             const std::optional<at::Tensor>& residual_scale,
                             const std::optional<at::Tensor>& residual_shift) {
  check_input(input, "input");
  const auto acc = accumulate_type(input.scalar_type());
  check_channel_vector(mean, input, acc, "mean");
  check_channel_vector(scale, input, acc, "scale");
  if (shift) check_channel_vector(*shift, input, acc, "shift");
  TORCH_CHECK(residual.has_value() || (!residual_mean && !residual_scale && !residual_shift),
              "fusedres: residual_mean / residual_scale / residual_shift given without a residual");
  if (residual) check_same(*residual, input, "residual");
  if (residual_mean) check_channel_vector(*residual_mean, input, acc, "residual_mean");
  if (residual_scale) check_channel_vector(*residual_scale, input, acc, "residual_scale");
  if (residual_shift) check_channel_vector(*residual_shift, input, acc, "residual_shift");
}

// Arguments of batch_norm_coefficients: an eval BN's running statistics (required) and its
// optional weight and bias, each C values of a floating dtype on input's device.
inline void check_coefficients_args(const at::Tensor& input, const at::Tensor& running_mean,
                                    const at::Tensor& running_var,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias) {
  check_input(input, "input");
  check_affine(running_mean, input, "running_mean");
  check_affine(running_var, input, "running_var");
  check_affine(weight, input, "weight");
  check_affine(bias, input, "bias");
}

// Arguments shared by the two BN backward passes.
// The backward's ReLU mask comes from the saved output, or (scale given) is recomputed from
// input as the forward computed that output: relu((input - mean) * scale + shift).
inline void check_backward_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& output,
                                const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& invstd,
                                const std::optional<at::Tensor>& scale = std::nullopt,
                                const std::optional<at::Tensor>& shift = std::nullopt) {
  check_input(input, "input");
  check_same(grad_out, input, "grad_out");
  if (output) check_same(*output, input, "output");
  const auto acc = accumulate_type(input.scalar_type());
  check_channel_vector(mean, input, acc, "mean");
  check_channel_vector(invstd, input, acc, "invstd");
  TORCH_CHECK(!(output && scale),
              "fusedres: give output or scale (the ReLU mask's source), not both");
  TORCH_CHECK(scale || !shift, "fusedres: shift needs scale (the ReLU mask's recomputation)");
  if (scale) check_channel_vector(*scale, input, acc, "scale");
  if (shift) check_channel_vector(*shift, input, acc, "shift");
}

// Operands of the folded conv + bias (+ residual) + ReLU ops, checked and brought into the
// input's memory format so that the output keeps it.
struct ConvOperands {
  at::Tensor input, weight;
  std::optional<at::Tensor> bias, residual;
  at::MemoryFormat format;
};

inline ConvOperands prepare_conv(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "fusedres: input must have shape (N, C, H, W), got ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fusedres: input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 4,
              "fusedres: weight must have shape (C_out, C_in / groups, kH, kW), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(),
              "fusedres: weight must have the dtype of input (", input.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "fusedres: weight is on ", weight.device(),
              " but input is on ", input.device());
  TORCH_CHECK(groups > 0 && input.size(1) == weight.size(1) * groups, "fusedres: input has ",
              input.size(1), " channels but weight expects ", weight.size(1) * groups,
              " (weight.size(1) * groups)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fusedres: stride, padding and dilation must have 2 values each");
  // Checked before the output size below divides by the stride.
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] > 0, "fusedres: stride must be positive, got ", stride);
    TORCH_CHECK(dilation[d] > 0, "fusedres: dilation must be positive, got ", dilation);
    TORCH_CHECK(padding[d] >= 0, "fusedres: padding must be non-negative, got ", padding);
    TORCH_CHECK(weight.size(d + 2) > 0, "fusedres: weight must have a kernel of at least 1x1, got ",
                weight.sizes());
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fusedres: bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()),
                "fusedres: bias must be a floating point tensor, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), "fusedres: bias is on ", bias->device(),
                " but input is on ", input.device());
  }
  // The output keeps the input's memory format, decided from its strides as PyTorch does
  // (an N x C x 1 x 1 tensor is NCHW). The weight is passed as it is: ATen picks the conv's
  // layout, and a copy of the (large) weight per call would cost more than the output fix-up.
  const at::MemoryFormat format = input.suggest_memory_format();
  ConvOperands c{input.contiguous(format), weight, bias, std::nullopt, format};
  if (residual) {
    std::vector<int64_t> out_size{input.size(0), weight.size(0)};
    for (int d = 0; d < 2; ++d) {
      const int64_t extent = dilation[d] * (weight.size(d + 2) - 1) + 1;
      out_size.push_back((input.size(d + 2) + 2 * padding[d] - extent) / stride[d] + 1);
    }
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_size),
                "fusedres: residual must have the convolution's output shape ",
                at::IntArrayRef(out_size), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(),
                "fusedres: residual must have the dtype of input (", input.scalar_type(), "), got ",
                residual->scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "fusedres: residual is on ",
                residual->device(), " but input is on ", input.device());
    c.residual = residual->contiguous(format);
  }
  return c;
}

// `t` in `format` with exactly the strides a new tensor of that format has. A tensor with
// size-1 dimensions can be dense in both formats with other strides (ATen's convolution may
// return an N x C x 1 x 1 output with channels_last strides for an NCHW input when the weight
// is channels_last); the fake kernels, and torch.compile with them, must see the real strides.
inline at::Tensor with_format_strides(const at::Tensor& t, at::MemoryFormat format) {
  at::Tensor dense = t.contiguous(format);
  const c10::DimVector strides =
      format == at::MemoryFormat::ChannelsLast
          ? c10::DimVector(c10::get_channels_last_strides_2d(dense.sizes()))
          : c10::contiguous_strides(dense.sizes());
  if (dense.strides() == at::IntArrayRef(strides)) return dense;
  return dense.as_strided(dense.sizes(), strides);  // same memory: only size-1 strides differ
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

}  // namespace fusedres
