// CUDA: per-channel mean and biased variance in one read of the input.
// Each thread accumulates shifted sums (its first value as the shift, so a large mean never
// cancels), turns them into (count, mean, M2), and the moments are combined with Chan's
// formula: across the block, then across blocks (merge_partials_kernel). The moments are
// merged in double, as on the CPU: a thread's mean rounded to float would lose the digits of
// the variance that its shifted sums kept (a mean of 3e4 has a float ulp of 0.002). The merges
// touch a few values per thread, so double arithmetic costs nothing measurable next to the
// pass over the input.
// add_batch_norm_stats: the statistics of input + residual, whose sum (rounded to the dtype,
// as the add would be) the same pass writes. The training forwards (../batch_norm_train.h)
// have the merge write the BN coefficients and move the running statistics as well (the
// statistics kernel counts the batch): stats, merge, normalize, three kernels.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../batch_norm_train.h"
#include "../channel_stats.h"
#include "utils.cuh"

namespace fusedres::cuda {
namespace {

using at::Tensor;

// K = 3 values a channel: count, mean, M2 (sum of squared deviations), in double.
using moment_t = double;

template <typename acc_t>
struct MomentsOp {
  static __device__ void init(moment_t* s) { s[0] = s[1] = s[2] = 0; }
  // a[k * stride], b[k * stride]: the k-th value (stride > 1 in shared memory).
  static __device__ void merge(moment_t* a, const moment_t* b, int stride = 1) {
    moment_t* const a1 = a + stride;
    moment_t* const a2 = a1 + stride;
    const moment_t nb = b[0];
    if (nb == 0) return;
    if (a[0] == 0) {
      a[0] = b[0], *a1 = b[stride], *a2 = b[2 * stride];
      return;
    }
    const moment_t mb = b[stride];
    if (!isfinite(*a1) || !isfinite(mb)) {
      // An Inf or NaN among the values: the mean as a sum would have it (Inf + x = Inf,
      // Inf - Inf = NaN) and the variance NaN, as PyTorch's batch norm gives.
      a[0] += nb;
      *a1 += mb;
      *a2 = NAN;
      return;
    }
    const moment_t n = a[0] + nb;
    const moment_t delta = mb - *a1;
    const moment_t wb = nb / n;
    *a2 += b[2 * stride] + delta * delta * a[0] * wb;
    *a1 += delta * wb;
    a[0] = n;
  }
  static __device__ void finish(const moment_t* s, acc_t* mean, acc_t* var) {
    store(mean, static_cast<acc_t>(s[1]));
    store(var, static_cast<acc_t>(s[0] > 0 ? s[2] / s[0] : 0));
  }
};

// Shifted sums of one channel's values seen by one thread.
template <typename acc_t>
struct ShiftedSums {
  acc_t shift = 0, sum = 0, sumsq = 0;
  __device__ void add(acc_t x, bool first) {
    if (first) shift = isfinite(x) ? x : acc_t(0);  // x - Inf would turn an Inf into NaN
    const acc_t d = x - shift;
    sum += d;
    sumsq += d * d;
  }
  __device__ void to_moments(acc_t count, moment_t* s) const {
    s[0] = count;
    if (count == acc_t(0)) {
      s[1] = s[2] = 0;
      return;
    }
    const acc_t offset = sum / count;
    s[1] = moment_t(shift) + moment_t(offset);  // exact: no rounding to the mean's ulp
    // (max() would turn the NaN of an Inf / NaN value into 0.)
    s[2] = isfinite(s[1]) ? moment_t(max(sumsq - sum * offset, acc_t(0))) : moment_t(NAN);
  }
};

// num_batches_tracked += 1, by one thread of the statistics kernel: the merge kernel after it
// reads the new count (a cumulative average's factor), and no thread of the merge writes it.
__device__ __forceinline__ void count_batch(int64_t* counter) {
  if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 &&
      threadIdx.y == 0)
    store(counter, load(counter) + 1);
}

// The dual form's second tensor (the shortcut's), of x's shape and layout: the blocks of
// blockIdx.z == 1 read it instead of x (there is no z then), into the second half of the
// partials, and count its own batch.
template <typename scalar_t>
struct SecondInput {
  const scalar_t* x;  // nullptr: none (a grid of one z)
  int64_t* counter;

  // (the kernel's own parameters, __restrict__ as they are)
  template <typename X, typename P, typename N>
  __device__ __forceinline__ void select(X& first, P& partials, N& first_counter,
                                         int64_t plane) const {
    if (blockIdx.z == 0) return;
    first = x;
    first_counter = counter;
    partials += plane;
  }
};

// VEC values of x at offset, or with z those of x + z, which are written to sum there.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load_values(const scalar_t* __restrict__ x,
                                                          const scalar_t* __restrict__ z,
                                                          scalar_t* __restrict__ sum,
                                                          int64_t offset) {
  auto v = load_vec<scalar_t, VEC>(x + offset);
  if (z != nullptr) {
    const auto r = load_vec<scalar_t, VEC>(z + offset);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      v.v[j] = static_cast<scalar_t>(static_cast<acc_t>(v.v[j]) + static_cast<acc_t>(r.v[j]));
    store_vec(sum + offset, v);
  }
  return v;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads, min_blocks_per_sm<scalar_t, VEC, 4, 6, 5>)
    stats_channels_last_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z,
                               scalar_t* __restrict__ sum, int64_t rows, int64_t C,
                               moment_t* __restrict__ partials, int64_t* __restrict__ counter,
                               SecondInput<scalar_t> second) {
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);
  second.select(x, partials, counter, 3 * int64_t(gridDim.y) * C);
  count_batch(counter);
  moment_t* smem = reinterpret_cast<moment_t*>(smem_bytes);
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;
  ShiftedSums<acc_t> sums[VEC];
  int64_t count = 0;
  if (active) {
    const int64_t stride = int64_t(gridDim.y) * blockDim.y;
#pragma unroll 4
    for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
      const auto v = load_values<scalar_t, acc_t, VEC>(x, z, sum, row * C + c0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sums[j].add(static_cast<acc_t>(v.v[j]), count == 0);
      ++count;
    }
  }
  moment_t state[VEC][3];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[j].to_moments(static_cast<acc_t>(count), state[j]);
  block_merge_rows<MomentsOp<acc_t>, 3, VEC>(state, smem, [&](int j, int k, moment_t value) {
    if (active) store(partials + (k * gridDim.y + blockIdx.y) * C + c0 + j, value);
  });
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void stats_channels_first_kernel(const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ z,
                                            scalar_t* __restrict__ sum, int64_t outer, int64_t C,
                                            PlaneUnits<VEC> walk, moment_t* __restrict__ partials,
                                            int64_t* __restrict__ counter,
                                            SecondInput<scalar_t> second) {
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);
  second.select(x, partials, counter, 3 * int64_t(gridDim.y) * C);
  count_batch(counter);
  moment_t* smem = reinterpret_cast<moment_t*>(smem_bytes);
  const int64_t c = blockIdx.x;
  const int64_t units = walk.units(outer);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  ShiftedSums<acc_t> sums;
  int64_t count = 0;
  for (int64_t u = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t o = walk.plane_of(u);
    walk.visit(u, o, (o * C + c) * walk.inner, [&](auto vec, int64_t i) {
      constexpr int V = decltype(vec)::value;
      const auto v = load_values<scalar_t, acc_t, V>(x, z, sum, i);
#pragma unroll
      for (int j = 0; j < V; ++j) sums.add(static_cast<acc_t>(v.v[j]), count + j == 0);
      count += V;
    });
  }
  moment_t state[3];
  sums.to_moments(static_cast<acc_t>(count), state);
  block_merge_all<MomentsOp<acc_t>, 3>(state, smem, [&](int k, moment_t value) {
    store(partials + (k * gridDim.y + blockIdx.y) * C + c, value);
  });
}

// The merge's epilogue for a training forward: the BN coefficients from the variance it just
// wrote, and the running statistics (../channel_stats.h, Coefficients and RunningStats).
template <typename acc_t>
struct CoefficientsEpilogue {
  ChannelParam weight, bias;
  acc_t eps;
  acc_t* invstd;
  acc_t* scale;
  acc_t* shift;
  ChannelBuffer running_mean, running_var;
  const int64_t* counter;  // the factor is 1 / *counter without a momentum
  bool cumulative;
  acc_t momentum;
  acc_t bessel;  // M / (M - 1)

  __device__ void operator()(int64_t c, const acc_t* mean, const acc_t* var) const {
    const acc_t v = load(var + c);
    const acc_t is = acc_t(1) / sqrt_rn(v + eps);
    store(invstd + c, is);
    store(scale + c, is * weight.get(c, acc_t(1)));
    store(shift + c, bias.get(c, acc_t(0)));
    if (running_mean.data == nullptr) return;
    const acc_t factor = cumulative ? acc_t(1) / static_cast<acc_t>(load(counter)) : momentum;
    running_mean.lerp_to(c, load(mean + c), factor);
    running_var.lerp_to(c, v * bessel, factor);
  }
};

// One tensor's statistics as a launch of launch_stats computes them: its values, where the
// merge writes (mean, var), and with coefficients the BN's coefficients and running
// statistics too (for both tensors of the dual form, or for neither).
template <typename scalar_t, typename acc_t>
struct StatsPlane {
  const scalar_t* x;
  acc_t* mean;
  acc_t* var;
  Coefficients* coefficients;
};

inline int64_t* counter_of(const Coefficients* c) {
  return c && c->running.counter.defined() ? c->running.counter.data_ptr<int64_t>() : nullptr;
}

template <typename acc_t>
CoefficientsEpilogue<acc_t> coefficients_epilogue(Coefficients& k) {
  const RunningStats& r = k.running;
  return {channel_param(k.weight),
          channel_param(k.bias),
          static_cast<acc_t>(k.eps),
          k.invstd.data_ptr<acc_t>(),
          k.scale.data_ptr<acc_t>(),
          k.shift.data_ptr<acc_t>(),
          channel_buffer(r.mean),
          channel_buffer(r.var),
          counter_of(&k),
          !r.momentum.has_value(),
          static_cast<acc_t>(r.momentum.value_or(0)),
          static_cast<acc_t>(static_cast<double>(r.count) / static_cast<double>(r.count - 1))};
}

// The statistics of p (z, sum: of p.x + z), or with q also those of q.x (the dual form): one
// statistics launch, its grid's z axis over the tensors, and one merge.
template <typename scalar_t, typename acc_t, int VEC>
void launch_stats(const ChannelView& v, const StatsPlane<scalar_t, acc_t>& p,
                  const StatsPlane<scalar_t, acc_t>* q, const scalar_t* z, scalar_t* sum,
                  const at::TensorOptions& options, int device, cudaStream_t stream) {
  const SecondInput<scalar_t> second{q ? q->x : nullptr, q ? counter_of(q->coefficients) : nullptr};
  const unsigned planes = q ? 2 : 1;
  Tensor partials;
  int64_t blocks;
  const auto partial_options = options.dtype(at::kDouble);
  // a row reads x (with z: and z, and writes their sum)
  const int64_t min_rows =
      min_partial_rows(3 * sizeof(moment_t), sizeof(scalar_t) * (z != nullptr ? 3 : 1));
  if (v.inner == 1) {
    const auto g = channels_last_reduction_grid(v, VEC, device, /*blocks_per_sm=*/8, min_rows);
    blocks = g.grid.y;
    partials = at::empty({planes, 3, blocks, v.channels}, partial_options);
    const size_t smem = size_t(g.block.x) * g.block.y * VEC * 3 * sizeof(moment_t);
    FUSEDRES_LAUNCH(dim3(g.grid.x, g.grid.y, planes), g.block, smem, stream,
                    stats_channels_last_kernel<scalar_t, acc_t, VEC>)(
        p.x, z, sum, v.outer, v.channels, partials.data_ptr<moment_t>(), counter_of(p.coefficients),
        second);
  } else {
    const dim3 grid = channels_first_grid(v, device, min_rows);
    blocks = grid.y;
    partials = at::empty({planes, 3, blocks, v.channels}, partial_options);
    const size_t smem = size_t(kBlockThreads) * 3 * sizeof(moment_t);
    FUSEDRES_LAUNCH(dim3(grid.x, grid.y, planes), kBlockThreads, smem, stream,
                    stats_channels_first_kernel<scalar_t, acc_t, VEC>)(
        p.x, z, sum, v.outer, v.channels, PlaneUnits<VEC>(v.inner), partials.data_ptr<moment_t>(),
        counter_of(p.coefficients), second);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const moment_t* parts = partials.const_data_ptr<moment_t>();
  if (p.coefficients == nullptr) {
    launch_merge_partials<MomentsOp<acc_t>, 3>(parts, blocks, v.channels, p.mean, p.var, stream);
    return;
  }
  using Outputs = MergeOutputs<acc_t, CoefficientsEpilogue<acc_t>>;
  const Outputs first{p.mean, p.var, coefficients_epilogue<acc_t>(*p.coefficients)};
  if (q == nullptr) {
    launch_merge_partials<MomentsOp<acc_t>, 3>(parts, blocks, v.channels, first, stream);
    return;
  }
  const Outputs other{q->mean, q->var, coefficients_epilogue<acc_t>(*q->coefficients)};
  launch_merge_partials<MomentsOp<acc_t>, 3>(parts, blocks, v.channels, first, stream, &other);
}

// The launches for input (with residual: input + residual, into sum), or with second also for
// second (the dual form: a tensor of input's shape and layout, its statistics into s).
void statistics_launches(const Tensor& input, const Tensor* residual, Tensor* sum, Tensor& mean,
                         Tensor& var, Coefficients* coefficients, const Tensor* second = nullptr,
                         Statistics* s = nullptr) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ChannelView v = channel_view(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using Plane = StatsPlane<scalar_t, acc_t>;
        const Plane p{input.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                      var.data_ptr<acc_t>(), coefficients};
        const Plane q = second
                            ? Plane{second->const_data_ptr<scalar_t>(), s->mean.data_ptr<acc_t>(),
                                    s->var.data_ptr<acc_t>(), &s->coefficients}
                            : Plane{};
        const Plane* other = second ? &q : nullptr;
        const scalar_t* z = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
        scalar_t* out = sum ? sum->data_ptr<scalar_t>() : nullptr;
        constexpr int V = kVec16<scalar_t>;
        if (can_vectorize(v, V) && aligned16(p.x) && aligned16(q.x) && aligned16(z) &&
            aligned16(out))
          launch_stats<scalar_t, acc_t, V>(v, p, other, z, out, mean.options(), input.get_device(),
                                           stream);
        else
          launch_stats<scalar_t, acc_t, 1>(v, p, other, z, out, mean.options(), input.get_device(),
                                           stream);
      });
}

}  // namespace

// (../channel_stats.h)
void channel_stats(const Tensor& input, const Tensor* residual, Tensor* sum, Tensor& mean,
                   Tensor& var, Coefficients* coefficients) {
  if (statistics_of_empty(input, mean, var, coefficients)) return;
  statistics_launches(input, residual, sum, mean, var, coefficients);
}

// (../channel_stats.h)
void dual_channel_stats(const Tensor& x, const Tensor& z, Statistics& sx, Statistics& sz) {
  if (x.numel() == 0) {
    channel_stats(x, nullptr, nullptr, sx.mean, sx.var, &sx.coefficients);
    channel_stats(z, nullptr, nullptr, sz.mean, sz.var, &sz.coefficients);
    return;
  }
  statistics_launches(x, nullptr, nullptr, sx.mean, sx.var, &sx.coefficients, &z, &sz);
}

FUSEDRES_LIBRARY_IMPL(FUSEDRES_CUDA_KEY, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_op<channel_stats>);
  m.impl("add_batch_norm_stats", &add_batch_norm_stats_op<channel_stats>);
  m.impl("batch_norm_act_train", &batch_norm_act_train<channel_stats>);
  m.impl("add_batch_norm_act_train", &add_batch_norm_act_train<channel_stats>);
  m.impl("dual_batch_norm_act_train", &dual_batch_norm_act_train<dual_channel_stats>);
}

}  // namespace fusedres::cuda
