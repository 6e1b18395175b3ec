// Helpers shared by the CUDA kernels: vector access, launch shapes, and the per-channel
// reductions over a ChannelView (a partial per block, then one kernel merges the partials).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#ifdef FUSEDRES_CUDA_EMULATION
#include "../emulation/cuda_runtime.h"  // host stand-ins: the kernels run on the CPU
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

// Values per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// A ChannelView can be read VEC values at a time when every VEC-run shares one channel
// (channels-first: inner % VEC == 0) or covers VEC consecutive channels (channels_last:
// C % VEC == 0) and the pointers are 16-byte aligned.
inline bool can_vectorize(const ChannelView& v, int vec) {
  return v.inner == 1 ? v.channels % vec == 0 : v.inner % vec == 0;
}

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride elementwise loop over `units` work items of 256 threads.
inline int elementwise_blocks(int64_t units, int device) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(units, 256), int64_t(sm_count(device)) * 16)));
}

// ---- per-channel reductions ------------------------------------------------------------
// A reduction keeps K values per channel. Each block reduces its share of the rows to one
// partial per channel (layout [K][blocks][C]); merge_partials_kernel then combines those.
// Op provides init(acc_t* s), merge(acc_t* a, const acc_t* b) and finish(s, out0, out1) over
// K values.

// Launch shape of a channels_last kernel: threads along x cover channel vectors (so each
// thread keeps its channels' parameters in registers), along y rows; the grid's y dimension
// splits the rows.
struct ChannelsLastGrid {
  dim3 block, grid;
};

inline ChannelsLastGrid channels_last_grid(const ChannelView& v, int vec, int device,
                                           int blocks_per_sm) {
  const int64_t vectors = ceil_div(v.channels, vec);
  int bx = 1;
  while (bx < 32 && bx < vectors) bx *= 2;
  const int by = 256 / bx;
  const int64_t gx = ceil_div(vectors, bx);
  const int64_t target = int64_t(sm_count(device)) * blocks_per_sm;
  const int64_t gy =
      std::clamp<int64_t>(target / gx, 1, std::min<int64_t>(ceil_div(v.outer, by), 65535));
  return {dim3(bx, by), dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy))};
}

// Channels-first: one block column per channel, the grid's y dimension splits its values.
inline dim3 channels_first_grid(const ChannelView& v, int device) {
  const int64_t target = int64_t(sm_count(device)) * 8;
  const int64_t per_channel_blocks = ceil_div(v.per_channel(), 256 * 4);
  const int64_t gy = std::clamp<int64_t>(ceil_div(target, v.channels), 1,
                                         std::min<int64_t>(per_channel_blocks, 65535));
  return dim3(static_cast<unsigned>(v.channels), static_cast<unsigned>(gy));
}

// Merges the K-value states of all threads of a block that hold the same channel(s)
// (threads (x, 0..blockDim.y)) into thread (x, 0). `state` holds VEC channels' K values.
// smem must hold blockDim.x * blockDim.y * VEC * K values.
template <class Op, int K, int VEC, typename acc_t>
__device__ void block_merge_rows(acc_t (&state)[VEC][K], acc_t* smem) {
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * VEC * K;
  for (int j = 0; j < VEC; ++j)
    for (int k = 0; k < K; ++k) smem[slot + j * K + k] = state[j][k];
  __syncthreads();
  if (threadIdx.y == 0) {
    for (unsigned row = 1; row < blockDim.y; ++row) {
      const acc_t* other = smem + (row * blockDim.x + threadIdx.x) * VEC * K;
      for (int j = 0; j < VEC; ++j) Op::merge(state[j], other + j * K);
    }
  }
}

// Merges the K-value states of all threads of a 1-D block into thread 0.
template <class Op, int K, typename acc_t>
__device__ void block_merge_all(acc_t (&state)[K], acc_t* smem) {
  for (int k = 0; k < K; ++k) smem[threadIdx.x * K + k] = state[k];
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) Op::merge(smem + threadIdx.x * K, smem + (threadIdx.x + stride) * K);
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < K; ++k) state[k] = smem[k];
}

// partials: [K][blocks][C] -> Op::finish(merge over the blocks) for each channel. A 32 x 8
// thread block serves 32 consecutive channels (coalesced reads); its 8 rows of threads
// split the partials, then row 0 merges the 8 results. state_t: the partials' type, out_t
// the outputs'.
constexpr int kMergeRows = 8;

template <class Op, int K, typename state_t, typename out_t>
__global__ void merge_partials_kernel(const state_t* __restrict__ partials, int64_t blocks,
                                      int64_t C, out_t* __restrict__ out0,
                                      out_t* __restrict__ out1) {
  FUSEDRES_DYNAMIC_SHARED(smem_bytes);  // [kMergeRows][32][K]
  auto smem = reinterpret_cast<state_t(*)[32][K]>(smem_bytes);
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  state_t state[K];
  Op::init(state);
  if (c < C) {
    for (int64_t b = threadIdx.y; b < blocks; b += kMergeRows) {
      state_t other[K];
      for (int k = 0; k < K; ++k) other[k] = load(partials + (k * blocks + b) * C + c);
      Op::merge(state, other);
    }
  }
  for (int k = 0; k < K; ++k) smem[threadIdx.y][threadIdx.x][k] = state[k];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int row = 1; row < kMergeRows; ++row) Op::merge(state, smem[row][threadIdx.x]);
    Op::finish(state, out0 + c, out1 + c);
  }
}

template <class Op, int K, typename state_t, typename out_t>
void launch_merge_partials(const state_t* partials, int64_t blocks, int64_t C, out_t* out0,
                           out_t* out1, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(C, 32));
  FUSEDRES_LAUNCH(grid, dim3(32, kMergeRows), kMergeRows * 32 * K * sizeof(state_t), stream,
                  merge_partials_kernel<Op, K, state_t, out_t>)(partials, blocks, C, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fusedres::cuda
