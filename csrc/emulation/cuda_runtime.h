// Host stand-ins for what the kernels of csrc/cuda use from CUDA, so that the very same
// sources compile with a C++ compiler (FUSEDRES_CUDA_EMULATION) into fusedres._C_emulated and
// run on CPU tensors. Only csrc/cuda/utils.cuh includes this, in place of the CUDA headers.
//
// A launch runs the grid's blocks one after another. A block's threads are fibers (one stack
// each) on one OS thread, all started before any finishes: each runs until it reaches
// __syncthreads() or returns, and the barrier releases only when every thread of the block
// has reached it, so a missing barrier lets a thread read shared memory its neighbours have not
// written yet. The kernels use dynamic shared memory only (a static __shared__ array does not
// compile here): the buffer is fresh for each block, filled with 0xFF bytes (a NaN for every
// float type), so a read of a value no thread of the block wrote shows, and ends at an
// inaccessible page, as each fiber's stack does below its bottom: an overrun faults
// (runtime.cpp).
// The device has few SMs (FUSEDRES_EMULATED_SMS, default 2), so the launchers size real grids:
// several blocks, several rows per thread.
//
// Cost counting (fusedres._cost, tests and bench only): see "cost counting" below and cost.cpp.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
// Static shared arrays would be neither poisoned nor bounds-checked: use FUSEDRES_DYNAMIC_SHARED.
#define __shared__ static_shared_memory_is_unchecked_in_the_emulation_use_FUSEDRES_DYNAMIC_SHARED

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fusedres::emulation {

// The running block's coordinates (per OS thread) and the running fiber's thread index.
extern thread_local dim3 block_idx, block_dim, grid_dim;
extern thread_local const dim3* thread_idx;

void syncthreads();
unsigned char* dynamic_shared();
int sm_count();

// Runs body (one kernel call) for every thread of every block; throws a c10::Error naming the
// kernel if a block's threads disagree on __syncthreads() or the launch is invalid.
void run(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
         const std::function<void()>& body);

// ---- cost counting ------------------------------------------------------------------------
// Every global-memory access of the kernels goes through the helpers of csrc/cuda/utils.cuh
// (load, store, load_vec, store_vec). While counting is on (fusedres._cost.count()), they call
// counted_load / counted_store, which record the access for the running launch: the bytes the
// instruction moves and which bytes it touches (cost.cpp). Counting off, the only cost is one
// predictable branch on `counting` per access; the CUDA build has no hook at all.
extern bool counting;
void begin_access(const void* p, size_t bytes, bool write);  // before the access
void end_access();                                           // after it

template <typename T>
T counted_load(const T* p) {
  begin_access(p, sizeof(T), /*write=*/false);
  const T value = *p;
  end_access();
  return value;
}

template <typename T>
void counted_store(T* p, const T& value) {
  begin_access(p, sizeof(T), /*write=*/true);
  *p = value;
  end_access();
}

template <typename Kernel>
struct Launch {
  const char* name;
  dim3 grid, block;
  size_t shared_bytes;
  Kernel* kernel;

  template <typename... Args>
  void operator()(Args... args) const {
    run(name, grid, block, shared_bytes, [&] { kernel(args...); });
  }
};

template <typename Kernel>
Launch<Kernel> launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes,
                      Kernel* kernel) {
  return {name, grid, block, shared_bytes, kernel};
}

}  // namespace fusedres::emulation

#define threadIdx (*::fusedres::emulation::thread_idx)
#define blockIdx (::fusedres::emulation::block_idx)
#define blockDim (::fusedres::emulation::block_dim)
#define gridDim (::fusedres::emulation::grid_dim)
#define __syncthreads() ::fusedres::emulation::syncthreads()

#define FUSEDRES_LAUNCH(grid, block, smem, stream, ...) \
  ::fusedres::emulation::launch(#__VA_ARGS__, grid, block, smem, __VA_ARGS__)
#define FUSEDRES_DYNAMIC_SHARED(name) unsigned char* name = ::fusedres::emulation::dynamic_shared()
// The counting hooks of utils.cuh's load / store helpers (see "cost counting" above).
#define FUSEDRES_COUNTED_LOAD(p)                                \
  if (__builtin_expect(::fusedres::emulation::counting, false)) \
  return ::fusedres::emulation::counted_load(p)
#define FUSEDRES_COUNTED_STORE(p, value)                        \
  if (__builtin_expect(::fusedres::emulation::counting, false)) \
  return ::fusedres::emulation::counted_store(p, value)

// Math the device code calls unqualified.
using std::isfinite;
using std::max;
using std::min;

// The runtime API, streams and guards: one emulated device, one (synchronous) stream.
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = ::fusedres::emulation::sm_count();
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)  // run() throws instead

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
