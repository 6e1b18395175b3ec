// Helpers shared by the CUDA kernels: vector access, launch shapes, and the per-channel
// reductions over a ChannelView (a partial per block, then one kernel merges the partials).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>
#ifdef FUSEDRES_CUDA_EMULATION
#include "../emulation/cuda_runtime.h"  // host stand-ins: the kernels run on the CPU
#ifndef __launch_bounds__
#define __launch_bounds__(...)  // an occupancy hint: nothing to the host compiler
#endif
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// A kernel launch, kernel<<<grid, block, shared_bytes, stream>>>(args...), written
// FUSEDRES_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) so that the emulation
// build can run it on the CPU.
#define FUSEDRES_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
#define FUSEDRES_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
// The emulation counts global-memory accesses here (cost counting); on the GPU nothing.
#define FUSEDRES_COUNTED_LOAD(p)
#define FUSEDRES_COUNTED_STORE(p, value)
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace fusedres::cuda {

// ---- global memory -----------------------------------------------------------------------
// Every read or write of global memory (tensors) in a kernel goes through load / store /
// load_vec / store_vec, never a plain dereference: the emulation counts the accesses there
// (kernel launches' bytes, fusedres._cost; FUSEDRES_COUNTED_* is empty in the CUDA build),
// and its strict mode fails a launch that touches a tensor any other way.

template <typename T>
struct Same {
  using type = T;
};

template <typename T>
__device__ __forceinline__ T load(const T* p) {
  FUSEDRES_COUNTED_LOAD(p);
  return *p;
}

// (value converts to T: the pointer alone decides the type written)
template <typename T>
__device__ __forceinline__ void store(T* p, const typename Same<T>::type& value) {
  FUSEDRES_COUNTED_STORE(p, value);
  *p = value;
}

// VEC values loaded or stored with one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return load(reinterpret_cast<const Vec<T, VEC>*>(p));
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  store(reinterpret_cast<Vec<T, VEC>*>(p), v);
}

// The normalize pass's term (x - m) * s + b: one expression for the apply kernels and the
// backward's ReLU mask recomputation, so that both round it alike (one fused multiply-add).
template <typename acc_t>
__device__ __forceinline__ acc_t affine_value(acc_t x, acc_t m, acc_t s, acc_t b) {
  return (x - m) * s + b;
}

// Values per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// A ChannelView is read VEC values at a time (the pointers 16-byte aligned) where its
// channels_last rows hold whole vectors (C % VEC == 0), or channels-first (PlaneUnits) where
// its planes hold whole vectors or are long enough that few of their values are read one by
// one (7x7: 7 of 49 on average at VEC = 8).
inline bool can_vectorize(const ChannelView& v, int vec) {
  return v.inner == 1 ? v.channels % vec == 0 : v.inner % vec == 0 || v.inner >= 4 * vec;
}

// ---- index arithmetic ----------------------------------------------------------------------
// n / d for a divisor fixed at launch: ATen's IntDivider (a multiply-high, an add and a shift)
// where d and n are below 2**31, not a division (tens of instructions; per vector, it was the
// channels-first kernels' index cost); beyond that, a division.
class Divider {
 public:
  explicit Divider(int64_t d)
      : d_(d),
        fast_(d <= INT32_MAX ? static_cast<unsigned>(d) : 1u),
        limit_(d <= INT32_MAX ? int64_t(INT32_MAX) : 0) {}

  __device__ __forceinline__ int64_t div(int64_t n) const {
    return n >= 0 && n <= limit_ ? fast_.div(static_cast<unsigned>(n)) : n / d_;
  }

  __host__ __device__ __forceinline__ int64_t divisor() const { return d_; }

 private:
  int64_t d_;
  at::cuda::detail::IntDivider<unsigned> fast_;
  int64_t limit_;  // n up to it: the fast form (0 where d itself is too large)
};

// ---- channels-first walks ------------------------------------------------------------------
// A channels-first tensor is outer x C planes of `inner` contiguous values (H*W). Its kernels
// walk each plane in `per_plane` units: unit k is the 16-byte-aligned vector at the plane's
// rounded-down start + k * VEC, clipped to the plane. A whole vector is one access; a clipped
// one (the plane's ends, where inner % VEC != 0) is read value by value. Each unit belongs to
// one channel, so its coefficients are a thread's scalars, and the index arithmetic is one
// Divider per unit (none per value).
template <int VEC>
struct PlaneUnits {
  int64_t inner;
  Divider per_plane;  // divides by the units of a plane

  explicit PlaneUnits(int64_t inner_)
      : inner(inner_),
        // aligned planes: inner / VEC units; else a plane starting one value short of a vector
        // boundary spans the most, ceil((inner + VEC - 1) / VEC)
        per_plane(inner_ % VEC == 0 ? inner_ / VEC : (inner_ + 2 * VEC - 2) / VEC) {}

  __host__ __device__ __forceinline__ int64_t units(int64_t planes) const {
    return planes * per_plane.divisor();
  }

  // The plane (of the tensor, or of a channel's planes) that unit u belongs to.
  __device__ __forceinline__ int64_t plane_of(int64_t u) const { return per_plane.div(u); }

  // body(std::integral_constant<int, V>, i): the V values at i (V = VEC or 1) of unit u, in
  // the plane `plane` (plane_of(u)) whose values start at `start`.
  template <typename Body>
  __device__ __forceinline__ void visit(int64_t u, int64_t plane, int64_t start,
                                        Body&& body) const {
    const int64_t k = u - plane * per_plane.divisor();
    const int64_t first = (start & ~int64_t(VEC - 1)) + k * VEC;
    const int64_t lo = max(start, first), hi = min(start + inner, first + VEC);
    if (hi - lo == VEC) {
      body(std::integral_constant<int, VEC>(), lo);
    } else {
      for (int64_t i = lo; i < hi; ++i) body(std::integral_constant<int, 1>(), i);
    }
  }
};

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block of the per-channel and elementwise kernels (channels_last_grid,
// elementwise_blocks, the channels-first reductions); their __launch_bounds__ rely on it.
constexpr int kBlockThreads = 256;
// __launch_bounds__'s resident blocks per SM for a kernel of kBlockThreads threads: `wide`
// for the 16-byte half / bf16 instantiations (8 channels' coefficients or sums a thread: 71-80
// registers unbounded, 3 blocks an SM; 4 blocks cap them at 64), `scalar` (VEC = 1) and
// `other` for the rest, chosen per kernel to keep at least their unbounded occupancy without
// spills where one value allows (ptxas allocates differently as soon as a template has a
// bound, so they cannot simply stay unbounded).
template <typename scalar_t, int VEC, int wide, int scalar, int other>
constexpr int min_blocks_per_sm = sizeof(scalar_t) == 2 && VEC == 8 ? wide
                                  : VEC == 1                        ? scalar
                                                                    : other;

// Blocks for a grid-stride elementwise loop over `units` work items of kBlockThreads threads.
inline int elementwise_blocks(int64_t units, int device) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(units, kBlockThreads), int64_t(sm_count(device)) * 16)));
}

// ---- per-channel vectors in their own dtype --------------------------------------------
// A BN's weight or bias, read in its own dtype (float, double, half or bfloat16).
struct ChannelParam {
  const void* data;  // nullptr: none
  at::ScalarType type;

  template <typename acc_t>
  __device__ acc_t get(int64_t c, acc_t absent) const {
    if (data == nullptr) return absent;
    switch (type) {
      case at::kDouble:
        return static_cast<acc_t>(load(static_cast<const double*>(data) + c));
      case at::kHalf:
        return static_cast<acc_t>(static_cast<float>(load(static_cast<const at::Half*>(data) + c)));
      case at::kBFloat16:
        return static_cast<acc_t>(
            static_cast<float>(load(static_cast<const at::BFloat16*>(data) + c)));
      default:
        return static_cast<acc_t>(load(static_cast<const float*>(data) + c));
    }
  }

  // f(values): the vector as a typed pointer (nullptr: none), for a thread that reads several
  // of its values (one switch, not one per value: fewer registers live across the branches).
  template <typename F>
  __device__ void visit(F&& f) const {
    switch (type) {
      case at::kDouble:
        f(static_cast<const double*>(data));
        break;
      case at::kHalf:
        f(static_cast<const at::Half*>(data));
        break;
      case at::kBFloat16:
        f(static_cast<const at::BFloat16*>(data));
        break;
      default:
        f(static_cast<const float*>(data));
    }
  }
};

inline ChannelParam channel_param(const at::Tensor& t) {
  return {t.defined() ? t.const_data_ptr() : nullptr, t.defined() ? t.scalar_type() : at::kFloat};
}

// A per-channel vector written in its own dtype (a running statistic, a parameter's
// gradient), and read back as ChannelParam.
struct ChannelBuffer {
  void* data;  // nullptr: none
  at::ScalarType type;

  template <typename acc_t>
  __device__ acc_t get(int64_t c) const {
    return ChannelParam{data, type}.get(c, acc_t(0));
  }

  template <typename acc_t>
  __device__ void set(int64_t c, acc_t value) const {
    switch (type) {
      case at::kDouble:
        store(static_cast<double*>(data) + c, static_cast<double>(value));
        break;
      case at::kHalf:
        store(static_cast<at::Half*>(data) + c, static_cast<at::Half>(static_cast<float>(value)));
        break;
      case at::kBFloat16:
        store(static_cast<at::BFloat16*>(data) + c,
              static_cast<at::BFloat16>(static_cast<float>(value)));
        break;
      default:
        store(static_cast<float*>(data) + c, static_cast<float>(value));
    }
  }

  // (value) moved by `weight` towards target, as torch.lerp computes it (two forms, exact at
  // weight 0 and 1).
  template <typename acc_t>
  __device__ void lerp_to(int64_t c, acc_t target, acc_t weight) const {
    const acc_t v = get<acc_t>(c);
    set(c, weight < acc_t(0.5) ? v + weight * (target - v)
                               : target - (target - v) * (acc_t(1) - weight));
  }
};

inline ChannelBuffer channel_buffer(const at::Tensor& t) {
  return {t.defined() ? t.data_ptr() : nullptr, t.defined() ? t.scalar_type() : at::kFloat};
}

// ---- per-channel reductions ------------------------------------------------------------
// A reduction keeps K values per channel. Each block reduces its share of the rows to one
// partial per channel (layout [K][blocks][C]); merge_partials_kernel then combines those.
// Op provides init(acc_t* s), merge(acc_t* a, const acc_t* b, int stride = 1) (the k-th
// value at [k * stride]) and finish(s, out0, out1) over K values.

// Launch shape of a channels_last kernel: threads along x cover channel vectors (so each
// thread keeps its channels' parameters in registers), along y rows; the grid's y dimension
// splits the rows.
struct ChannelsLastGrid {
  dim3 block, grid;
};

// bx threads across the channels (vectors of them), rows split into at most max_gy blocks.
inline ChannelsLastGrid channels_last_shape(const ChannelView& v, int64_t vectors, int bx,
                                            int64_t target, int64_t max_gy) {
  const int by = kBlockThreads / bx;
  const int64_t gx = ceil_div(vectors, bx);
  const int64_t gy =
      std::clamp<int64_t>(target / gx, 1, std::min<int64_t>(ceil_div(v.outer, by), max_gy));
  return {dim3(bx, by), dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy))};
}

// Threads across the channels: up to 32 (a warp reads 32 consecutive vectors of a row).
inline int channels_last_width(int64_t vectors) {
  int bx = 1;
  while (bx < 32 && bx < vectors) bx *= 2;
  return bx;
}

inline ChannelsLastGrid channels_last_grid(const ChannelView& v, int vec, int device,
                                           int blocks_per_sm) {
  const int64_t vectors = ceil_div(v.channels, vec);
  return channels_last_shape(v, vectors, channels_last_width(vectors),
                             int64_t(sm_count(device)) * blocks_per_sm, 65535);
}

// A reduction's blocks each write a partial per channel, which the merge reads again: each
// block reduces at least min_partial_rows rows (or values of a channel), so that the partials
// move at most 1 / kPartialShare of the bytes the reduction's rows move. (Sized to fill the
// GPU alone, a 7x7 BN at N = 256, 12,544 rows over 528 block rows, wrote partials of half its
// input's size, which the merge read again.)
constexpr int64_t kPartialShare = 64;

// partial_bytes: what a block writes per channel; row_bytes: what a row moves per channel.
inline int64_t min_partial_rows(int64_t partial_bytes, int64_t row_bytes) {
  return ceil_div(kPartialShare * partial_bytes, row_bytes);
}

// channels_last_grid for a reduction: at most one block row per min_rows rows; where that
// leaves fewer than half the blocks the GPU wants, narrower blocks (fewer channels, more rows
// each) make more of them across the channels, down to 2 threads (32 bytes) of a row.
inline ChannelsLastGrid channels_last_reduction_grid(const ChannelView& v, int vec, int device,
                                                     int blocks_per_sm, int64_t min_rows) {
  const int64_t vectors = ceil_div(v.channels, vec);
  const int64_t target = int64_t(sm_count(device)) * blocks_per_sm;
  const int64_t max_gy = std::clamp<int64_t>(v.outer / min_rows, 1, 65535);
  for (int bx = channels_last_width(vectors);; bx /= 2) {
    const ChannelsLastGrid g = channels_last_shape(v, vectors, bx, target, max_gy);
    if (bx <= 2 || int64_t(g.grid.x) * g.grid.y >= target / 2) return g;
  }
}

// A channels-first reduction: one block column per channel, the grid's y dimension splits its
// values, at least min_values of them a block (min_partial_rows).
inline dim3 channels_first_grid(const ChannelView& v, int device, int64_t min_values) {
  const int64_t target = int64_t(sm_count(device)) * 8;
  const int64_t per_channel_blocks = std::min(ceil_div(v.per_channel(), kBlockThreads * 4),
                                              std::max<int64_t>(1, v.per_channel() / min_values));
  const int64_t gy = std::clamp<int64_t>(ceil_div(target, v.channels), 1,
                                         std::min<int64_t>(per_channel_blocks, 65535));
  return dim3(static_cast<unsigned>(v.channels), static_cast<unsigned>(gy));
}

// Tree merge over a block's threads (lane, index): the `count` threads of each lane (index
// 0..count-1) merge their N x K states pairwise, log2(count) levels deep, in an order fixed
// by the shape alone (deterministic); index 0 then gets result(j, k, value) for each value.
// smem holds N * K * count * lanes values, laid out [N * K][count][lanes]: consecutive lanes
// touch consecutive words (no bank conflicts). Every thread of the block must call it (it
// synchronizes). The levels merge shared memory in place, one of the N states at a time, and
// the result goes out from there: a thread's N states are never held twice in registers (the
// kernels' register count is set by their worst point).
template <class Op, int K, int N, typename acc_t, typename Result>
__device__ void tree_merge(const acc_t (&state)[N][K], acc_t* smem, unsigned lane, unsigned lanes,
                           unsigned index, unsigned count, Result&& result) {
  const int plane = static_cast<int>(count * lanes);
  acc_t* mine = smem + index * lanes + lane;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int k = 0; k < K; ++k) mine[(j * K + k) * plane] = state[j][k];
  unsigned half = 1;
  while (half * 2 < count) half *= 2;
  for (; half > 0; half /= 2) {
    __syncthreads();
    if (index < half && index + half < count) {
      const acc_t* theirs = mine + half * lanes;
#pragma unroll 1
      for (int j = 0; j < N; ++j) Op::merge(mine + j * K * plane, theirs + j * K * plane, plane);
    }
  }
  if (index == 0)  // (its own writes: no barrier needed)
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
      for (int k = 0; k < K; ++k) result(j, k, mine[(j * K + k) * plane]);
}

// Merges the K-value states of all threads of a block that hold the same channel(s)
// (threads (x, 0..blockDim.y)); thread (x, 0) gets the result as result(j, k, value) for
// each of its VEC channels j. smem must hold blockDim.x * blockDim.y * VEC * K values.
template <class Op, int K, int VEC, typename acc_t, typename Result>
__device__ void block_merge_rows(const acc_t (&state)[VEC][K], acc_t* smem, Result&& result) {
  tree_merge<Op, K, VEC>(state, smem, threadIdx.x, blockDim.x, threadIdx.y, blockDim.y, result);
}

// Merges the K-value states of all threads of a 1-D block; thread 0 gets the result as
// result(k, value). smem must hold blockDim.x * K values.
template <class Op, int K, typename acc_t, typename Result>
__device__ void block_merge_all(const acc_t (&state)[K], acc_t* smem, Result&& result) {
  tree_merge<Op, K, 1>(reinterpret_cast<const acc_t(&)[1][K]>(state), smem, 0, 1, threadIdx.x,
                       blockDim.x, [&](int, int k, acc_t value) { result(k, value); });
}

// partials: [K][blocks][C] -> Op::finish(merge over the blocks) for each channel. A
// 32 x kMergeRows thread block serves 32 consecutive channels (coalesced reads); each row
// of threads takes every kMergeRows-th partial, kMergeLoads of them per pass: their loads
// are all issued before any merge and merged pairwise, so a pass waits for memory once.
// Then the rows merge in a tree. With the ~1056 partials of a small-C channels_last
// reduction, a thread's chain is ~9 passes plus log2(kMergeRows) levels, not 1056 / 8 + 7
// dependent load-merge steps. state_t: the partials' type, out_t the outputs'.
constexpr int kMergeRows = 32;
constexpr int kMergeLoads = 4;

// What the merge kernel does next with a channel's two outputs, in the thread that wrote
// them: nothing, or epilogue(c, out0, out1) computes more per-channel values from them (the
// BN coefficients: batch_norm_stats.cu), so no per-channel ops follow the merge.
struct NoEpilogue {
  template <typename out_t>
  __device__ void operator()(int64_t, const out_t*, const out_t*) const {}
};

// Where the merge of one reduction writes: the two outputs and the epilogue after them.
template <typename out_t, class Epilogue>
struct MergeOutputs {
  out_t* out0;
  out_t* out1;
  Epilogue epilogue;
};

// blockIdx.y picks the reduction: 0 the first, 1 the second (the dual form's two BNs, merged
// by one launch), whose partials follow the first's ([2][K][blocks][C]).
template <class Op, int K, typename state_t, typename out_t, class Epilogue>
__global__ void __launch_bounds__(32 * kMergeRows)
    merge_partials_kernel(const state_t* __restrict__ partials, int64_t blocks, int64_t C,
                          MergeOutputs<out_t, Epilogue> first,
                          MergeOutputs<out_t, Epilogue> second) {
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);  // [K][kMergeRows][32]
  state_t* smem = reinterpret_cast<state_t*>(smem_bytes);
  const MergeOutputs<out_t, Epilogue> o = blockIdx.y == 0 ? first : second;
  partials += int64_t(blockIdx.y) * K * blocks * C;
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  state_t state[1][K];
  Op::init(state[0]);
  if (c < C) {
    for (int64_t b0 = threadIdx.y; b0 < blocks; b0 += kMergeRows * kMergeLoads) {
      state_t part[kMergeLoads][K];
#pragma unroll
      for (int i = 0; i < kMergeLoads; ++i) {
        const int64_t b = b0 + int64_t(i) * kMergeRows;
        if (b < blocks) {
#pragma unroll
          for (int k = 0; k < K; ++k) part[i][k] = load(partials + (k * blocks + b) * C + c);
        } else {
          Op::init(part[i]);
        }
      }
#pragma unroll
      for (int s = 1; s < kMergeLoads; s *= 2)
#pragma unroll
        for (int i = 0; i + s < kMergeLoads; i += 2 * s) Op::merge(part[i], part[i + s]);
      Op::merge(state[0], part[0]);
    }
  }
  tree_merge<Op, K, 1>(state, smem, threadIdx.x, 32, threadIdx.y, kMergeRows,
                       [&](int, int k, state_t value) { state[0][k] = value; });
  if (threadIdx.y == 0 && c < C) {
    Op::finish(state[0], o.out0 + c, o.out1 + c);
    o.epilogue(c, o.out0, o.out1);
  }
}

// Merges one reduction's partials, or with `second` also a second one's (one launch).
template <class Op, int K, typename state_t, typename out_t, class Epilogue>
void launch_merge_partials(const state_t* partials, int64_t blocks, int64_t C,
                           const MergeOutputs<out_t, Epilogue>& first, cudaStream_t stream,
                           const MergeOutputs<out_t, Epilogue>* second = nullptr) {
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), second != nullptr ? 2 : 1);
  FUSEDRES_LAUNCH(grid, dim3(32, kMergeRows), kMergeRows * 32 * K * sizeof(state_t), stream,
                  merge_partials_kernel<Op, K, state_t, out_t, Epilogue>)(
      partials, blocks, C, first, second != nullptr ? *second : first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Op, int K, typename state_t, typename out_t, class Epilogue = NoEpilogue>
void launch_merge_partials(const state_t* partials, int64_t blocks, int64_t C, out_t* out0,
                           out_t* out1, cudaStream_t stream, Epilogue epilogue = {}) {
  launch_merge_partials<Op, K>(partials, blocks, C,
                               MergeOutputs<out_t, Epilogue>{out0, out1, epilogue}, stream);
}

// Square roots rounded as IEEE (nvcc's default -prec-sqrt=true; the host's sqrt).
__device__ __forceinline__ float sqrt_rn(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_rn(double v) { return sqrt(v); }

}  // namespace fusedres::cuda
