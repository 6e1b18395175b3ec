// Helpers shared by the CUDA kernels: vector access, launch shapes, and the per-channel
// reductions over a ChannelView (a partial per block, then one warp per channel merges).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace fusedres::cuda {

// VEC values loaded or stored with one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
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

// Value at position `i` of `x`, masked by the ReLU of the saved output `y` (if any): the
// gradient passes where !(y <= 0), as threshold_backward.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t masked_grad(scalar_t dy, const scalar_t* y, int64_t i) {
  return (y != nullptr && static_cast<acc_t>(y[i]) <= acc_t(0)) ? acc_t(0) : static_cast<acc_t>(dy);
}

// ---- per-channel reductions ------------------------------------------------------------
// A reduction keeps K values per channel. Each block reduces its share of the rows to one
// partial per channel (layout [K][blocks][C]); merge_partials_kernel then combines those,
// one warp per channel. Op provides `merge(acc_t* a, const acc_t* b)` over K values.

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
  const int64_t gy = std::clamp<int64_t>(target / gx, 1, std::min<int64_t>(ceil_div(v.outer, by), 65535));
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
    for (int row = 1; row < blockDim.y; ++row) {
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
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) Op::merge(smem + threadIdx.x * K, smem + (threadIdx.x + stride) * K);
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < K; ++k) state[k] = smem[k];
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_down(acc_t v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

// partials: [K][blocks][C] -> out[c] = Op::finish(merge of the blocks' states); one warp per
// channel, 8 channels per 256-thread block.
template <class Op, int K, typename acc_t>
__global__ void merge_partials_kernel(const acc_t* __restrict__ partials, int64_t blocks,
                                      int64_t C, acc_t* __restrict__ out0,
                                      acc_t* __restrict__ out1) {
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;
  acc_t state[K];
  Op::init(state);
  for (int64_t b = lane; b < blocks; b += 32) {
    acc_t other[K];
    for (int k = 0; k < K; ++k) other[k] = partials[(k * blocks + b) * C + c];
    Op::merge(state, other);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    acc_t other[K];
    for (int k = 0; k < K; ++k) other[k] = shfl_down(state[k], offset);
    Op::merge(state, other);
  }
  if (lane == 0) Op::finish(state, out0 + c, out1 + c);
}

template <class Op, int K, typename acc_t>
void launch_merge_partials(const acc_t* partials, int64_t blocks, int64_t C, acc_t* out0,
                           acc_t* out1, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(C, 8));
  merge_partials_kernel<Op, K, acc_t><<<grid, 256, 0, stream>>>(partials, blocks, C, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fusedres::cuda
