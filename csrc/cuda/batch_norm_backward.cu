// CUDA: the training BN backward in two passes over (grad_out, output, input):
//   reduce: sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) per channel (and g itself, written
//           in the same pass, with write_grad)
//   input:  grad_input = weight * invstd * (g - sum_dy / M - xhat * sum_dy_xhat / M)
//           (+ extra_grad, a gradient the input also receives, added before rounding)
// g = grad_out masked by the forward's ReLU (read from the saved output, or recomputed from x
// with the forward's scale and shift), xhat = (x - mean) * invstd. The reduce pass follows
// batch_norm_stats.cu: per-thread sums, a block merge, then a merge of the blocks' partials.
// dual_batch_norm_backward: the kDual kernels do the same for both BNs of relu(bn(x) +
// bn_r(r)) at once: the reduce also sums g * rhat, one merge launch takes both BNs' partials,
// and the input pass writes both gradients from one read of (grad_out, output, x, r).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "utils.cuh"

namespace fusedres::cuda {
namespace {

using at::Tensor;

// K values a channel: sum(g), sum(g * xhat) (the dual form's reduce: and sum(g * rhat)).
template <typename acc_t, int K = 2>
struct SumsOp {
  static __device__ void init(acc_t* s) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] = acc_t(0);
  }
  // a[k * stride], b[k * stride]: the k-th value (stride > 1 in shared memory).
  static __device__ void merge(acc_t* a, const acc_t* b, int stride = 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k * stride] += b[k * stride];
  }
  static __device__ void finish(const acc_t* s, acc_t* sum_dy, acc_t* sum_dy_xhat) {
    store(sum_dy, s[0]);
    store(sum_dy_xhat, s[1]);
  }
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ y;  // saved output, nullptr without ReLU mask
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ invstd;
  // The forward's scale / shift (shift nullptr: 0); with y nullptr and scale given, the ReLU
  // mask is recomputed from x.
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  scalar_t* __restrict__ masked_out;  // the reduce writes g here; nullptr: not written
};

// The dual form's second BN (dual_batch_norm_backward): its input r (the shortcut, in x's
// layout), mean, invstd and weight; the input pass also reads sum(g * rhat) and writes r's
// gradient. The kernels read it only in their kDual instantiations.
template <typename scalar_t, typename acc_t>
struct Shortcut {
  const scalar_t* __restrict__ r;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ invstd;
  ChannelParam weight;
  const acc_t* __restrict__ sum_dy_rhat;
  scalar_t* __restrict__ dr;
};

// A reduce block's result for value k of one channel c: the partials are [2][blocks][C],
// (sum(g), sum(g * xhat)); the dual form's [2][2][blocks][C], its second BN's (sum(g),
// sum(g * rhat)) after the first's, so that one merge launch takes both (sum(g) twice).
template <bool kDual, typename acc_t>
__device__ __forceinline__ void store_partial(acc_t* partials, int64_t C, int k, int64_t c,
                                              acc_t value) {
  const int64_t blocks = gridDim.y;
  auto at = [&](int plane, int q) {
    return partials + ((plane * 2 + q) * blocks + blockIdx.y) * C + c;
  };
  if (k < 2) store(at(0, k), value);
  if (kDual && k != 1) store(at(1, k == 0 ? 0 : 1), value);
}

// One channel's coefficients of the recomputed mask (with the mean): the forward's scale and
// shift.
template <typename acc_t>
struct MaskCoefficients {
  acc_t s = 1, b = 0;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ MaskCoefficients<acc_t> mask_coefficients(
    const BackwardArgs<scalar_t, acc_t>& a, int64_t c) {
  MaskCoefficients<acc_t> k;
  if (a.scale != nullptr) {
    k.s = load(a.scale + c);
    if (a.shift != nullptr) k.b = load(a.shift + c);
  }
  return k;
}

// Stores g (exact: grad_out's value or 0) when the reduce was asked to write it.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void store_masked_grad(const BackwardArgs<scalar_t, acc_t>& a, int64_t i,
                                                  const acc_t (&g)[VEC]) {
  if (a.masked_out == nullptr) return;
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(g[j]);
  store_vec<scalar_t, VEC>(a.masked_out + i, out);
}

// g: grad_out, passing where !(y <= 0) as threshold_backward, y the saved output or (scale
// given) the forward's output recomputed from x as the apply kernel computed and stored it.
// mu[j], k[j]: element j's mean and mask coefficients (only read when recomputing).
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_masked_grad(const BackwardArgs<scalar_t, acc_t>& a, int64_t i,
                                                 const acc_t (&mu)[VEC],
                                                 const MaskCoefficients<acc_t> (&k)[VEC],
                                                 acc_t (&g)[VEC], acc_t (&x)[VEC]) {
  const auto dyv = load_vec<scalar_t, VEC>(a.dy + i);
  const auto xv = load_vec<scalar_t, VEC>(a.x + i);
  Vec<scalar_t, VEC> yv;
  if (a.y != nullptr) yv = load_vec<scalar_t, VEC>(a.y + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    x[j] = static_cast<acc_t>(xv.v[j]);
    bool pass = true;
    if (a.y != nullptr) {
      pass = !(static_cast<acc_t>(yv.v[j]) <= acc_t(0));
    } else if (a.scale != nullptr) {
      acc_t value = affine_value(x[j], mu[j], k[j].s, k[j].b);
      if (value < acc_t(0)) value = acc_t(0);
      pass = !(static_cast<acc_t>(static_cast<scalar_t>(value)) <= acc_t(0));
    }
    g[j] = pass ? static_cast<acc_t>(dyv.v[j]) : acc_t(0);
  }
}

// (kDual: the second BN's vectors and sums take the 16-byte kernels to ~120 registers, which
// 2 blocks an SM leave without spills; ptxas, sm_90)
template <typename scalar_t, typename acc_t, int VEC, bool kDual>
__global__ void __launch_bounds__(kBlockThreads, kDual ? min_blocks_per_sm<scalar_t, VEC, 2, 6, 3>
                                                       : min_blocks_per_sm<scalar_t, VEC, 4, 6, 4>)
    reduce_channels_last_kernel(BackwardArgs<scalar_t, acc_t> a, Shortcut<scalar_t, acc_t> r,
                                int64_t rows, int64_t C, acc_t* __restrict__ partials) {
  constexpr int K = kDual ? 3 : 2;
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;
  acc_t state[VEC][K] = {};
  if (active) {
    acc_t mu[VEC], is[VEC], rmu[VEC], ris[VEC];
    MaskCoefficients<acc_t> k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      mu[j] = load(a.mean + c0 + j);
      is[j] = load(a.invstd + c0 + j);
      k[j] = mask_coefficients(a, c0 + j);
      if constexpr (kDual) rmu[j] = load(r.mean + c0 + j), ris[j] = load(r.invstd + c0 + j);
    }
    const int64_t stride = int64_t(gridDim.y) * blockDim.y;
#pragma unroll 2
    for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
      acc_t g[VEC], x[VEC];
      load_masked_grad<scalar_t, acc_t, VEC>(a, row * C + c0, mu, k, g, x);
      store_masked_grad<scalar_t, acc_t, VEC>(a, row * C + c0, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        state[j][0] += g[j];
        state[j][1] += g[j] * (x[j] - mu[j]) * is[j];
      }
      if constexpr (kDual) {
        const auto rv = load_vec<scalar_t, VEC>(r.r + row * C + c0);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          state[j][K - 1] += g[j] * (static_cast<acc_t>(rv.v[j]) - rmu[j]) * ris[j];
      }
    }
  }
  block_merge_rows<SumsOp<acc_t, K>, K, VEC>(state, smem, [&](int j, int k, acc_t value) {
    if (active) store_partial<kDual>(partials, C, k, c0 + j, value);
  });
}

template <typename scalar_t, typename acc_t, int VEC, bool kDual>
__global__ void reduce_channels_first_kernel(BackwardArgs<scalar_t, acc_t> a,
                                             Shortcut<scalar_t, acc_t> r, int64_t outer, int64_t C,
                                             PlaneUnits<VEC> walk, acc_t* __restrict__ partials) {
  constexpr int K = kDual ? 3 : 2;
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t c = blockIdx.x;
  const acc_t mu = load(a.mean + c), is = load(a.invstd + c);
  acc_t rmu = 0, ris = 0;
  if constexpr (kDual) rmu = load(r.mean + c), ris = load(r.invstd + c);
  const MaskCoefficients<acc_t> kc = mask_coefficients(a, c);
  const int64_t units = walk.units(outer);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  acc_t state[K] = {};
  for (int64_t u = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t o = walk.plane_of(u);
    walk.visit(u, o, (o * C + c) * walk.inner, [&](auto vec, int64_t i) {
      constexpr int V = decltype(vec)::value;
      acc_t mus[V], g[V], x[V];
      MaskCoefficients<acc_t> k[V];
#pragma unroll
      for (int j = 0; j < V; ++j) mus[j] = mu, k[j] = kc;
      load_masked_grad<scalar_t, acc_t, V>(a, i, mus, k, g, x);
      store_masked_grad<scalar_t, acc_t, V>(a, i, g);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        state[0] += g[j];
        state[1] += g[j] * (x[j] - mu) * is;
      }
      if constexpr (kDual) {
        const auto rv = load_vec<scalar_t, V>(r.r + i);
#pragma unroll
        for (int j = 0; j < V; ++j)
          state[K - 1] += g[j] * (static_cast<acc_t>(rv.v[j]) - rmu) * ris;
      }
    });
  }
  block_merge_all<SumsOp<acc_t, K>, K>(
      state, smem, [&](int k, acc_t value) { store_partial<kDual>(partials, C, k, c, value); });
}

// grad_input = k[c] * (g - mean_dy[c] - (x - mean[c]) * proj[c])
template <typename acc_t>
struct InputGradParams {
  ChannelParam weight;  // in its own dtype; none: 1
  const acc_t* __restrict__ sum_dy;
  const acc_t* __restrict__ sum_dy_xhat;
  acc_t inv_count;  // 1 / M
};

template <typename acc_t>
__device__ __forceinline__ void channel_coefficients(const acc_t* mean, const acc_t* invstd,
                                                     const InputGradParams<acc_t>& p, int64_t c,
                                                     acc_t weight, acc_t& mu, acc_t& k,
                                                     acc_t& mean_dy, acc_t& proj) {
  const acc_t is = load(invstd + c);
  mu = load(mean + c);
  k = weight * is;
  mean_dy = load(p.sum_dy + c) * p.inv_count;
  proj = load(p.sum_dy_xhat + c) * p.inv_count * is;
}

// The extra gradient's VEC values at i (0 without one).
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_extra(const scalar_t* __restrict__ extra, int64_t i,
                                           acc_t (&e)[VEC]) {
  if (extra == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = acc_t(0);
    return;
  }
  const auto v = load_vec<scalar_t, VEC>(extra + i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) e[j] = static_cast<acc_t>(v.v[j]);
}

// The dual form's second gradient dr = rk[c] * (g - mean_dy[c] - (r - rmu[c]) * rproj[c]),
// VEC values at i.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void store_shortcut_grad(const Shortcut<scalar_t, acc_t>& s, int64_t i,
                                                    const acc_t (&g)[VEC],
                                                    const acc_t (&mean_dy)[VEC],
                                                    const acc_t (&rmu)[VEC], const acc_t (&rk)[VEC],
                                                    const acc_t (&rproj)[VEC]) {
  const auto rv = load_vec<scalar_t, VEC>(s.r + i);
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    out.v[j] = static_cast<scalar_t>(
        rk[j] * (g[j] - mean_dy[j] - (static_cast<acc_t>(rv.v[j]) - rmu[j]) * rproj[j]));
  store_vec<scalar_t, VEC>(s.dr + i, out);
}

// (kDual: as the reduce's)
template <typename scalar_t, typename acc_t, int VEC, bool kDual>
__global__ void __launch_bounds__(kBlockThreads, kDual ? min_blocks_per_sm<scalar_t, VEC, 2, 6, 3>
                                                       : min_blocks_per_sm<scalar_t, VEC, 4, 8, 4>)
    input_grad_channels_last_kernel(BackwardArgs<scalar_t, acc_t> a, InputGradParams<acc_t> p,
                                    Shortcut<scalar_t, acc_t> s, const scalar_t* __restrict__ extra,
                                    scalar_t* __restrict__ dx, int64_t rows, int64_t C) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  acc_t weight[VEC];
  p.weight.visit([&](const auto* w) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) weight[j] = w ? static_cast<acc_t>(load(w + c0 + j)) : acc_t(1);
  });
  acc_t mu[VEC], k[VEC], mean_dy[VEC], proj[VEC];
  MaskCoefficients<acc_t> mk[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    channel_coefficients(a.mean, a.invstd, p, c0 + j, weight[j], mu[j], k[j], mean_dy[j], proj[j]);
    mk[j] = mask_coefficients(a, c0 + j);
  }
  acc_t rmu[VEC], rk[VEC], rproj[VEC];
  if constexpr (kDual) {
    const InputGradParams<acc_t> rp{s.weight, p.sum_dy, s.sum_dy_rhat, p.inv_count};
    s.weight.visit([&](const auto* w) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t unused;
        channel_coefficients(s.mean, s.invstd, rp, c0 + j,
                             w ? static_cast<acc_t>(load(w + c0 + j)) : acc_t(1), rmu[j], rk[j],
                             unused, rproj[j]);
      }
    });
  }
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
#pragma unroll 2
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const int64_t i = row * C + c0;
    acc_t g[VEC], x[VEC];
    load_masked_grad<scalar_t, acc_t, VEC>(a, i, mu, mk, g, x);
    acc_t e[VEC];
    load_extra<scalar_t, acc_t, VEC>(extra, i, e);
    Vec<scalar_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] =
          static_cast<scalar_t>(k[j] * (g[j] - mean_dy[j] - (x[j] - mu[j]) * proj[j]) + e[j]);
    store_vec<scalar_t, VEC>(dx + i, out);
    if constexpr (kDual)
      store_shortcut_grad<scalar_t, acc_t, VEC>(s, i, g, mean_dy, rmu, rk, rproj);
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool kDual>
__global__ void input_grad_channels_first_kernel(BackwardArgs<scalar_t, acc_t> a,
                                                 InputGradParams<acc_t> p,
                                                 Shortcut<scalar_t, acc_t> s,
                                                 const scalar_t* __restrict__ extra,
                                                 scalar_t* __restrict__ dx, PlaneUnits<VEC> walk,
                                                 int64_t units, Divider channels) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t plane = walk.plane_of(u);
    const int64_t c = plane - channels.div(plane) * channels.divisor();
    acc_t mu, k, mean_dy, proj;
    channel_coefficients(a.mean, a.invstd, p, c, p.weight.get(c, acc_t(1)), mu, k, mean_dy, proj);
    const MaskCoefficients<acc_t> kc = mask_coefficients(a, c);
    acc_t rmu = 0, rk = 0, rproj = 0;
    if constexpr (kDual) {
      const InputGradParams<acc_t> rp{s.weight, p.sum_dy, s.sum_dy_rhat, p.inv_count};
      acc_t unused;
      channel_coefficients(s.mean, s.invstd, rp, c, s.weight.get(c, acc_t(1)), rmu, rk, unused,
                           rproj);
    }
    walk.visit(u, plane, plane * walk.inner, [&](auto vec, int64_t i) {
      constexpr int V = decltype(vec)::value;
      acc_t mus[V], g[V], x[V], e[V];
      MaskCoefficients<acc_t> mk[V];
#pragma unroll
      for (int j = 0; j < V; ++j) mus[j] = mu, mk[j] = kc;
      load_masked_grad<scalar_t, acc_t, V>(a, i, mus, mk, g, x);
      load_extra<scalar_t, acc_t, V>(extra, i, e);
      Vec<scalar_t, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j)
        out.v[j] = static_cast<scalar_t>(k * (g[j] - mean_dy - (x[j] - mu) * proj) + e[j]);
      store_vec<scalar_t, V>(dx + i, out);
      if constexpr (kDual) {
        acc_t rmus[V], rks[V], rprojs[V], mean_dys[V];
#pragma unroll
        for (int j = 0; j < V; ++j)
          rmus[j] = rmu, rks[j] = rk, rprojs[j] = rproj, mean_dys[j] = mean_dy;
        store_shortcut_grad<scalar_t, acc_t, V>(s, i, g, mean_dys, rmus, rks, rprojs);
      }
    });
  }
}

struct Prepared {
  Tensor grad_out, input;
  std::optional<Tensor> output;
  Tensor mean, invstd;
  std::optional<Tensor> scale, shift;
};

Prepared prepare(const Tensor& grad_out, const std::optional<Tensor>& output, const Tensor& input_,
                 const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& scale,
                 const std::optional<Tensor>& shift) {
  check_backward_args(grad_out, output, input_, mean, invstd, scale, shift);
  const Tensor input = dense_for_kernels(input_);
  return {match_layout(grad_out, input),
          input,
          match_layout(output, input),
          mean.contiguous(),
          invstd.contiguous(),
          contiguous(scale),
          contiguous(shift)};
}

template <typename scalar_t, typename acc_t>
BackwardArgs<scalar_t, acc_t> kernel_args(const Prepared& t, const Tensor& masked_out = {}) {
  return {t.grad_out.const_data_ptr<scalar_t>(),
          t.output ? t.output->const_data_ptr<scalar_t>() : nullptr,
          t.input.const_data_ptr<scalar_t>(),
          t.mean.const_data_ptr<acc_t>(),
          t.invstd.const_data_ptr<acc_t>(),
          t.scale ? t.scale->const_data_ptr<acc_t>() : nullptr,
          t.shift ? t.shift->const_data_ptr<acc_t>() : nullptr,
          masked_out.defined() ? masked_out.data_ptr<scalar_t>() : nullptr};
}

template <typename scalar_t, typename acc_t>
bool vectorizable(const ChannelView& v, const BackwardArgs<scalar_t, acc_t>& a,
                  const void* out = nullptr) {
  return can_vectorize(v, kVec16<scalar_t>) && aligned16(a.dy) && aligned16(a.y) &&
         aligned16(a.x) && aligned16(a.masked_out) && aligned16(out);
}

// The reduce's merge epilogue: the parameters' gradients in their dtype (grad_dtype), from the
// sums it just wrote, so no cast follows.
struct ParameterGradsEpilogue {
  ChannelBuffer grad_weight, grad_bias;

  template <typename acc_t>
  __device__ void operator()(int64_t c, const acc_t* sum_dy, const acc_t* sum_dy_xhat) const {
    if (grad_weight.data == nullptr) return;
    grad_weight.set(c, load(sum_dy_xhat + c));
    grad_bias.set(c, load(sum_dy + c));
  }
};

// The reduce and its merge; kDual: also the second BN's sums (r), merged by the same launch
// into `second`.
template <typename scalar_t, typename acc_t, int VEC, bool kDual = false>
void launch_reduce(const ChannelView& v, const BackwardArgs<scalar_t, acc_t>& a, acc_t* sum_dy,
                   acc_t* sum_dy_xhat, const ParameterGradsEpilogue& grads,
                   const at::TensorOptions& acc_options, int device, cudaStream_t stream,
                   const Shortcut<scalar_t, acc_t>& r = {},
                   const MergeOutputs<acc_t, ParameterGradsEpilogue>* second = nullptr) {
  constexpr int K = kDual ? 3 : 2;
  const int64_t planes = kDual ? 2 : 1;
  Tensor partials;
  int64_t blocks;
  // Rows counted by what every form reads, dy and x (and r): the grid, and so the order of
  // the sums, is the same whether the ReLU mask comes from y or is recomputed from x.
  const int64_t min_rows =
      min_partial_rows(planes * 2 * sizeof(acc_t), int64_t(sizeof(scalar_t)) * (kDual ? 3 : 2));
  if (v.inner == 1) {
    const auto g = channels_last_reduction_grid(v, VEC, device, /*blocks_per_sm=*/8, min_rows);
    blocks = g.grid.y;
    partials = at::empty({planes, 2, blocks, v.channels}, acc_options);
    const size_t smem = size_t(g.block.x) * g.block.y * VEC * K * sizeof(acc_t);
    FUSEDRES_LAUNCH(g.grid, g.block, smem, stream,
                    reduce_channels_last_kernel<scalar_t, acc_t, VEC, kDual>)(
        a, r, v.outer, v.channels, partials.data_ptr<acc_t>());
  } else {
    const dim3 grid = channels_first_grid(v, device, min_rows);
    blocks = grid.y;
    partials = at::empty({planes, 2, blocks, v.channels}, acc_options);
    const size_t smem = size_t(kBlockThreads) * K * sizeof(acc_t);
    FUSEDRES_LAUNCH(grid, kBlockThreads, smem, stream,
                    reduce_channels_first_kernel<scalar_t, acc_t, VEC, kDual>)(
        a, r, v.outer, v.channels, PlaneUnits<VEC>(v.inner), partials.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_merge_partials<SumsOp<acc_t>, 2>(
      partials.const_data_ptr<acc_t>(), blocks, v.channels,
      MergeOutputs<acc_t, ParameterGradsEpilogue>{sum_dy, sum_dy_xhat, grads}, stream, second);
}

template <typename scalar_t, typename acc_t, int VEC, bool kDual = false>
void launch_input_grad(const ChannelView& v, const BackwardArgs<scalar_t, acc_t>& a,
                       const InputGradParams<acc_t>& p, const scalar_t* extra, scalar_t* dx,
                       int device, cudaStream_t stream, const Shortcut<scalar_t, acc_t>& s = {}) {
  if (v.inner == 1) {
    const auto g = channels_last_grid(v, VEC, device, /*blocks_per_sm=*/8);
    FUSEDRES_LAUNCH(g.grid, g.block, 0, stream,
                    input_grad_channels_last_kernel<scalar_t, acc_t, VEC, kDual>)(
        a, p, s, extra, dx, v.outer, v.channels);
  } else {
    const PlaneUnits<VEC> walk(v.inner);
    const int64_t units = walk.units(v.outer * v.channels);
    FUSEDRES_LAUNCH(elementwise_blocks(units, device), kBlockThreads, 0, stream,
                    input_grad_channels_first_kernel<scalar_t, acc_t, VEC, kDual>)(
        a, p, s, extra, dx, walk, units, Divider(v.channels));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_backward_reduce(
    const Tensor& grad_out, const std::optional<Tensor>& output, const Tensor& input,
    const Tensor& mean, const Tensor& invstd, bool write_grad, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& shift, std::optional<at::ScalarType> grad_dtype) {
  const Prepared t = prepare(grad_out, output, input, mean, invstd, scale, shift);
  check_grad_dtype(grad_dtype);
  const int64_t C = t.input.size(1);
  Tensor sum_dy = at::empty({C}, t.mean.options());
  Tensor sum_dy_xhat = at::empty({C}, t.mean.options());
  Tensor masked_grad = write_grad ? at::empty_like(t.input) : at::empty({0}, t.input.options());
  auto [grad_weight, grad_bias] = empty_parameter_grads(sum_dy, grad_dtype);
  if (t.input.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    grad_weight.zero_();
    grad_bias.zero_();
    return {sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias};
  }
  const ParameterGradsEpilogue grads{
      grad_dtype ? channel_buffer(grad_weight) : ChannelBuffer{nullptr, at::kFloat},
      grad_dtype ? channel_buffer(grad_bias) : ChannelBuffer{nullptr, at::kFloat}};
  const c10::cuda::CUDAGuard guard(t.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ChannelView v = channel_view(t.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(), "batch_norm_backward_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto a = kernel_args<scalar_t, acc_t>(t, write_grad ? masked_grad : Tensor());
        if (vectorizable(v, a))
          launch_reduce<scalar_t, acc_t, kVec16<scalar_t>>(
              v, a, sum_dy.data_ptr<acc_t>(), sum_dy_xhat.data_ptr<acc_t>(), grads,
              t.mean.options(), t.input.get_device(), stream);
        else
          launch_reduce<scalar_t, acc_t, 1>(v, a, sum_dy.data_ptr<acc_t>(),
                                            sum_dy_xhat.data_ptr<acc_t>(), grads, t.mean.options(),
                                            t.input.get_device(), stream);
      });
  return {sum_dy, sum_dy_xhat, masked_grad, grad_weight, grad_bias};
}

Tensor batch_norm_backward_input(const Tensor& grad_out, const std::optional<Tensor>& output,
                                 const Tensor& input, const Tensor& mean, const Tensor& invstd,
                                 const std::optional<Tensor>& weight, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xhat, const std::optional<Tensor>& scale,
                                 const std::optional<Tensor>& shift,
                                 const std::optional<Tensor>& extra_grad) {
  const Prepared t = prepare(grad_out, output, input, mean, invstd, scale, shift);
  const auto acc = accumulate_type(t.input.scalar_type());
  check_channel_vector(sum_dy, t.input, acc, "sum_dy");
  check_channel_vector(sum_dy_xhat, t.input, acc, "sum_dy_xhat");
  check_affine(weight, t.input, "weight");
  if (extra_grad) check_same(*extra_grad, input, "extra_grad");
  const std::optional<Tensor> extra = match_layout(extra_grad, t.input);
  Tensor grad_input = at::empty_like(t.input);
  if (t.input.numel() == 0) return grad_input;
  const c10::cuda::CUDAGuard guard(t.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ChannelView v = channel_view(t.input);
  const Tensor weight_ = channel_parameter(weight, acc);
  const Tensor sums0 = sum_dy.contiguous(), sums1 = sum_dy_xhat.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(), "batch_norm_backward_input", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto a = kernel_args<scalar_t, acc_t>(t);
        const InputGradParams<acc_t> p{channel_param(weight_), sums0.const_data_ptr<acc_t>(),
                                       sums1.const_data_ptr<acc_t>(),
                                       acc_t(1) / static_cast<acc_t>(v.per_channel())};
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        const scalar_t* e = extra ? extra->const_data_ptr<scalar_t>() : nullptr;
        if (vectorizable(v, a, dx) && aligned16(e))
          launch_input_grad<scalar_t, acc_t, kVec16<scalar_t>>(v, a, p, e, dx, t.input.get_device(),
                                                               stream);
        else
          launch_input_grad<scalar_t, acc_t, 1>(v, a, p, e, dx, t.input.get_device(), stream);
      });
  return grad_input;
}

// ParameterGradsEpilogue writing a BN's parameter gradients into (grad_weight, grad_bias).
ParameterGradsEpilogue grads_into(const Tensor& grad_weight, const Tensor& grad_bias) {
  return {channel_buffer(grad_weight), channel_buffer(grad_bias)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_batch_norm_backward(
    const Tensor& grad_out, const std::optional<Tensor>& output, const Tensor& input,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const Tensor& residual, const Tensor& residual_mean, const Tensor& residual_invstd,
    const std::optional<Tensor>& residual_weight, std::optional<at::ScalarType> grad_dtype,
    std::optional<at::ScalarType> residual_grad_dtype) {
  const Prepared t = prepare(grad_out, output, input, mean, invstd, std::nullopt, std::nullopt);
  check_dual_backward_args(t.input, weight, residual, residual_mean, residual_invstd,
                           residual_weight, grad_dtype, residual_grad_dtype);
  const Tensor r = match_layout(residual, t.input);
  const Tensor r_mean = residual_mean.contiguous(), r_invstd = residual_invstd.contiguous();
  const int64_t C = t.input.size(1);
  const auto acc = t.mean.options();
  // sum(g) (twice: each BN's merge writes its own), sum(g * xhat), sum(g * rhat); each BN's
  // parameter gradients in their dtype, written by the merge.
  Tensor sum_dy = at::empty({C}, acc), sum_dy_again = at::empty({C}, acc);
  Tensor sum_dy_xhat = at::empty({C}, acc), sum_dy_rhat = at::empty({C}, acc);
  Tensor grads[4];
  for (int i = 0; i < 4; ++i)
    grads[i] = at::empty(
        {C},
        acc.dtype((i < 2 ? grad_dtype : residual_grad_dtype).value_or(acc.dtype().toScalarType())));
  Tensor grad_input = at::empty_like(t.input), grad_residual = at::empty_like(t.input);
  if (t.input.numel() == 0) {
    for (auto& g : grads) g.zero_();
    return {grad_input, grad_residual, grads[0], grads[1], grads[2], grads[3]};
  }
  const c10::cuda::CUDAGuard guard(t.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ChannelView v = channel_view(t.input);
  const auto acc_type = accumulate_type(t.input.scalar_type());
  const Tensor weight_ = channel_parameter(weight, acc_type);
  const Tensor residual_weight_ = channel_parameter(residual_weight, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(), "dual_batch_norm_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto a = kernel_args<scalar_t, acc_t>(t);
        const Shortcut<scalar_t, acc_t> s{
            r.const_data_ptr<scalar_t>(),        r_mean.const_data_ptr<acc_t>(),
            r_invstd.const_data_ptr<acc_t>(),    channel_param(residual_weight_),
            sum_dy_rhat.const_data_ptr<acc_t>(), grad_residual.data_ptr<scalar_t>()};
        const MergeOutputs<acc_t, ParameterGradsEpilogue> second{sum_dy_again.data_ptr<acc_t>(),
                                                                 sum_dy_rhat.data_ptr<acc_t>(),
                                                                 grads_into(grads[2], grads[3])};
        const InputGradParams<acc_t> p{channel_param(weight_), sum_dy.const_data_ptr<acc_t>(),
                                       sum_dy_xhat.const_data_ptr<acc_t>(),
                                       acc_t(1) / static_cast<acc_t>(v.per_channel())};
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        auto launches = [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          launch_reduce<scalar_t, acc_t, V, true>(
              v, a, sum_dy.data_ptr<acc_t>(), sum_dy_xhat.data_ptr<acc_t>(),
              grads_into(grads[0], grads[1]), acc, t.input.get_device(), stream, s, &second);
          launch_input_grad<scalar_t, acc_t, V, true>(v, a, p, nullptr, dx, t.input.get_device(),
                                                      stream, s);
        };
        if (vectorizable(v, a, dx) && aligned16(s.r) && aligned16(s.dr))
          launches(std::integral_constant<int, kVec16<scalar_t>>{});
        else
          launches(std::integral_constant<int, 1>{});
      });
  return {grad_input, grad_residual, grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

FUSEDRES_LIBRARY_IMPL(FUSEDRES_CUDA_KEY, m) {
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input);
  m.impl("dual_batch_norm_backward", &dual_batch_norm_backward);
}

}  // namespace fusedres::cuda
