// CUDA: the normalize pass (../normalize_act.h) and batch_norm_apply, its op; and
// batch_norm_coefficients, an eval BN's vectors for it.
// channels_last: each thread owns VEC channels (16-byte accesses) and walks rows, its
// channels' parameters held in registers. Channels-first: a grid-stride loop over the planes'
// units (PlaneUnits), one channel each.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../normalize_act.h"
#include "utils.cuh"

namespace fusedres::cuda {
namespace {

using at::Tensor;

// Per-channel vectors; nullptr means 0 (mean, shift) or 1 (scale).
template <typename acc_t>
struct NormalizeParams {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* residual_mean;
  const acc_t* residual_scale;
  const acc_t* residual_shift;
  bool relu;
};

// One channel's coefficients: out = act((x - m) * s + b + (r - rm) * rs + rb).
template <typename acc_t>
struct Coefficients {
  acc_t m, s, b, rm, rs, rb;

  __device__ __forceinline__ Coefficients(const NormalizeParams<acc_t>& p, int64_t c)
      : m(p.mean ? load(p.mean + c) : acc_t(0)),
        s(p.scale ? load(p.scale + c) : acc_t(1)),
        b(p.shift ? load(p.shift + c) : acc_t(0)),
        rm(p.residual_mean ? load(p.residual_mean + c) : acc_t(0)),
        rs(p.residual_scale ? load(p.residual_scale + c) : acc_t(1)),
        rb(p.residual_shift ? load(p.residual_shift + c) : acc_t(0)) {}
  __device__ __forceinline__ Coefficients() {}

  template <typename scalar_t>
  __device__ __forceinline__ scalar_t apply(acc_t x, bool has_residual, acc_t r, bool relu) const {
    acc_t value = affine_value(x, m, s, b);
    if (has_residual) value += (r - rm) * rs + rb;
    // (value < 0) keeps NaN, as torch.relu does.
    if (relu && value < acc_t(0)) value = acc_t(0);
    return static_cast<scalar_t>(value);
  }
};

// The residual term, a template argument of the channels_last kernel: each thread keeps 3
// coefficients a channel in registers without a residual or with a plain one (the 16-byte
// half / bf16 kernel then fits 64 registers), 6 when the residual has its own (80 registers:
// 3 blocks an SM; on sm_80 float / double spill at 5).
enum ResidualKind { kNoResidual, kPlainResidual, kAffineResidual };

template <typename scalar_t, int VEC, int RESIDUAL>
constexpr int normalize_min_blocks =
    RESIDUAL == kAffineResidual ? min_blocks_per_sm<scalar_t, VEC, 3, 8, 4>
                                : min_blocks_per_sm<scalar_t, VEC, 4, 8, 5>;

template <typename scalar_t, typename acc_t, int VEC, int RESIDUAL>
__global__ void __launch_bounds__(kBlockThreads, normalize_min_blocks<scalar_t, VEC, RESIDUAL>)
    normalize_channels_last_kernel(const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ residual,
                                   scalar_t* __restrict__ out, NormalizeParams<acc_t> p,
                                   int64_t rows, int64_t C) {
  constexpr bool has_residual = RESIDUAL != kNoResidual;
  if (RESIDUAL != kAffineResidual)  // (null: the compiler folds the constants 0, 1, 0 in)
    p.residual_mean = p.residual_scale = p.residual_shift = nullptr;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  Coefficients<acc_t> k[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) k[j] = Coefficients<acc_t>(p, c0 + j);
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
#pragma unroll 2
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const int64_t i = row * C + c0;
    const auto xv = load_vec<scalar_t, VEC>(x + i);
    Vec<scalar_t, VEC> rv;
    if (has_residual) rv = load_vec<scalar_t, VEC>(residual + i);
    Vec<scalar_t, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t r = has_residual ? static_cast<acc_t>(rv.v[j]) : acc_t(0);
      yv.v[j] = k[j].template apply<scalar_t>(static_cast<acc_t>(xv.v[j]), has_residual, r, p.relu);
    }
    store_vec<scalar_t, VEC>(out + i, yv);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void normalize_channels_first_kernel(const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ residual,
                                                scalar_t* __restrict__ out,
                                                NormalizeParams<acc_t> p, PlaneUnits<VEC> walk,
                                                int64_t units, Divider channels) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t plane = walk.plane_of(u);
    const int64_t c = plane - channels.div(plane) * channels.divisor();
    const Coefficients<acc_t> k(p, c);
    walk.visit(u, plane, plane * walk.inner, [&](auto vec, int64_t i) {
      constexpr int V = decltype(vec)::value;
      const auto xv = load_vec<scalar_t, V>(x + i);
      Vec<scalar_t, V> rv;
      if (residual != nullptr) rv = load_vec<scalar_t, V>(residual + i);
      Vec<scalar_t, V> yv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t r = residual != nullptr ? static_cast<acc_t>(rv.v[j]) : acc_t(0);
        yv.v[j] =
            k.template apply<scalar_t>(static_cast<acc_t>(xv.v[j]), residual != nullptr, r, p.relu);
      }
      store_vec<scalar_t, V>(out + i, yv);
    });
  }
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_normalize(const ChannelView& v, const scalar_t* x, const scalar_t* residual,
                      scalar_t* out, const NormalizeParams<acc_t>& p, int device,
                      cudaStream_t stream) {
  if (v.inner == 1) {
    const auto g = channels_last_grid(v, VEC, device, /*blocks_per_sm=*/8);
    if (residual == nullptr)
      FUSEDRES_LAUNCH(g.grid, g.block, 0, stream,
                      normalize_channels_last_kernel<scalar_t, acc_t, VEC, kNoResidual>)(
          x, residual, out, p, v.outer, v.channels);
    else if (p.residual_mean || p.residual_scale || p.residual_shift)
      FUSEDRES_LAUNCH(g.grid, g.block, 0, stream,
                      normalize_channels_last_kernel<scalar_t, acc_t, VEC, kAffineResidual>)(
          x, residual, out, p, v.outer, v.channels);
    else
      FUSEDRES_LAUNCH(g.grid, g.block, 0, stream,
                      normalize_channels_last_kernel<scalar_t, acc_t, VEC, kPlainResidual>)(
          x, residual, out, p, v.outer, v.channels);
  } else {
    const PlaneUnits<VEC> walk(v.inner);
    const int64_t units = walk.units(v.outer * v.channels);
    FUSEDRES_LAUNCH(elementwise_blocks(units, device), kBlockThreads, 0, stream,
                    normalize_channels_first_kernel<scalar_t, acc_t, VEC>)(
        x, residual, out, p, walk, units, Divider(v.channels));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// batch_norm_coefficients: a thread per channel. The square root and the division are
// IEEE-rounded, as the training merge's (CoefficientsEpilogue, batch_norm_stats.cu).
template <typename acc_t>
__global__ void coefficients_kernel(ChannelParam running_mean, ChannelParam running_var,
                                    ChannelParam weight, ChannelParam bias, acc_t eps, int64_t C,
                                    acc_t* __restrict__ mean, acc_t* __restrict__ scale,
                                    acc_t* __restrict__ shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  store(mean + c, running_mean.get(c, acc_t(0)));
  const acc_t invstd = acc_t(1) / sqrt_rn(running_var.get(c, acc_t(0)) + eps);
  store(scale + c, invstd * weight.get(c, acc_t(1)));
  store(shift + c, bias.get(c, acc_t(0)));
}

}  // namespace

// (../normalize_act.h)
void coefficients(const CoefficientsArgs& a, Tensor& mean, Tensor& scale, Tensor& shift) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm_coefficients", [&] {
    FUSEDRES_LAUNCH(static_cast<unsigned>(ceil_div(C, kBlockThreads)), kBlockThreads, 0, stream,
                    coefficients_kernel<scalar_t>)(
        channel_param(a.running_mean), channel_param(a.running_var), channel_param(a.weight),
        channel_param(a.bias), static_cast<scalar_t>(a.eps), C, mean.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void normalize_act(const Tensor& input, const NormalizeArgs& a, Tensor& out) {
  if (input.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = input.get_device();
  const ChannelView v = channel_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "normalize_act", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const NormalizeParams<acc_t> p{ptr_or_null<acc_t>(a.mean),
                                       ptr_or_null<acc_t>(a.scale),
                                       ptr_or_null<acc_t>(a.shift),
                                       ptr_or_null<acc_t>(a.residual_mean),
                                       ptr_or_null<acc_t>(a.residual_scale),
                                       ptr_or_null<acc_t>(a.residual_shift),
                                       a.relu};
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        const scalar_t* r = ptr_or_null<scalar_t>(a.residual);
        scalar_t* y = out.data_ptr<scalar_t>();
        constexpr int V = kVec16<scalar_t>;
        if (can_vectorize(v, V) && aligned16(x) && aligned16(r) && aligned16(y))
          launch_normalize<scalar_t, acc_t, V>(v, x, r, y, p, device, stream);
        else
          launch_normalize<scalar_t, acc_t, 1>(v, x, r, y, p, device, stream);
      });
}

FUSEDRES_LIBRARY_IMPL(FUSEDRES_CUDA_KEY, m) {
  m.impl("batch_norm_apply", &batch_norm_apply_op<normalize_act>);
  m.impl("batch_norm_coefficients", &batch_norm_coefficients_op<coefficients>);
}

}  // namespace fusedres::cuda
