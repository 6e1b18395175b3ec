// The emulated CUDA runtime (see cuda_runtime.h) and the Python module fusedres._C_emulated:
// importing it registers the fusedres_emulated library (schemas, compositions and the CUDA
// kernels of csrc/cuda compiled for the CPU). Test-only: the `cuda-emulated` backend.
//
// Out-of-bounds accesses: while guard_allocations(True) is on, every CPU tensor is allocated
// by GuardedAllocator, which ends each allocation (rounded up to 16 bytes, so vector paths
// keep their alignment) right before an inaccessible page. A kernel that reads or writes past
// the end of a tensor faults there; the fault handler leaves the kernel and the launch throws
// an error naming the kernel, its block and thread, instead of crashing the process.
//
// Cost counting (kernel launches and their global-memory bytes, for fusedres._cost): cost.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <c10/core/CPUAllocator.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../cuda/utils.cuh"  // the counted global-memory helpers, for the test-only kernels
#include "../library.h"
#include "cost.h"
#include "cuda_runtime.h"

namespace fusedres::emulation {

thread_local dim3 block_idx, block_dim, grid_dim;
thread_local const dim3* thread_idx = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;

// `bytes` of memory (rounded up to 16, keeping 16-byte alignment) next to an inaccessible page:
// after it (an overrun faults: tensors, shared memory) or before it (a downward-growing stack
// that overflows faults). Faults inside a kernel become errors (run()).
struct GuardedRegion {
  void* base = nullptr;
  size_t mapped = 0;
  char* data = nullptr;

  GuardedRegion() = default;
  GuardedRegion(size_t bytes, bool guard_after) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t used = (bytes + 15) / 16 * 16;
    mapped = (used + page - 1) / page * page + page;
    base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "guarded allocation of ", bytes, " bytes failed");
    char* guard = guard_after ? static_cast<char*>(base) + mapped - page : static_cast<char*>(base);
    TORCH_CHECK(mprotect(guard, page, PROT_NONE) == 0, "mprotect failed");
    data = guard_after ? guard - used : guard + page;
  }
  GuardedRegion(GuardedRegion&& other) noexcept { *this = std::move(other); }
  GuardedRegion& operator=(GuardedRegion&& other) noexcept {
    std::swap(base, other.base);
    std::swap(mapped, other.mapped);
    std::swap(data, other.data);
    return *this;
  }
  ~GuardedRegion() {
    if (base != nullptr) munmap(base, mapped);
  }
};

struct Fiber {
  ucontext_t context;
  GuardedRegion stack;  // an overflow faults instead of corrupting the next fiber's stack
  dim3 index;
  bool done = false, waiting = false;
};

// The block running on this OS thread.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  GuardedRegion shared;  // the dynamic shared memory of the running block
};

thread_local Block block;

// Fault handling: where run() resumes when a kernel touches an inaccessible page. The handler
// is installed for the duration of a launch only (FaultHandler), on this thread's own signal
// stack (a fiber's stack may be the one that overflowed).
thread_local sigjmp_buf* fault_target = nullptr;
thread_local void* fault_address = nullptr;
thread_local std::vector<char> signal_stack;

void on_fault(int, siginfo_t* info, void*) {
  if (fault_target == nullptr) return;  // cannot happen while installed; re-faults if it did
  fault_address = info->si_addr;
  siglongjmp(*fault_target, 1);
}

struct FaultHandler {
  struct sigaction previous_segv{}, previous_bus{};
  FaultHandler() {
    if (signal_stack.empty()) {
      signal_stack.resize(64 * 1024);
      stack_t stack{};
      stack.ss_sp = signal_stack.data();
      stack.ss_size = signal_stack.size();
      sigaltstack(&stack, nullptr);
    }
    struct sigaction action{};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
    sigaction(SIGBUS, &action, &previous_bus);
  }
  ~FaultHandler() {
    fault_target = nullptr;
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
  }
};

std::mutex launched_mutex;
std::set<std::string> launched;  // kernel names, without template arguments

void fiber_main() {
  Fiber* self = block.current;
  try {
    (*block.body)();
  } catch (...) {
    if (!block.error) block.error = std::current_exception();
  }
  self->done = true;
  swapcontext(&self->context, &block.scheduler);
}

// Runs every unfinished fiber until its next barrier or its end; true once all are done.
bool run_round() {
  bool any_waiting = false, any_done_now = false;
  for (Fiber& f : block.fibers) {
    if (f.done) continue;
    f.waiting = false;
    block.current = &f;
    thread_idx = &f.index;
    swapcontext(&block.scheduler, &f.context);
    any_waiting |= f.waiting;
    any_done_now |= f.done;
  }
  TORCH_CHECK(!(any_waiting && any_done_now), "divergent __syncthreads(): some threads of block (",
              block_idx.x, ", ", block_idx.y, ", ", block_idx.z,
              ") returned while others wait at a barrier");
  return !any_waiting;
}

std::string base_name(const char* kernel) {
  std::string name(kernel);
  return name.substr(0, name.find('<'));
}

}  // namespace

void syncthreads() {
  Fiber* self = block.current;
  self->waiting = true;
  swapcontext(&self->context, &block.scheduler);
}

unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(block.shared.data); }

// set_emulated_sms(n) overrides FUSEDRES_EMULATED_SMS (n = 0: back to it); fusedres._cost
// sizes grids as on an H100 (132 SMs) with it.
int sm_count_override = 0;

int sm_count() {
  static const int count = [] {
    const char* env = std::getenv("FUSEDRES_EMULATED_SMS");
    const int n = env ? std::atoi(env) : 2;
    return n > 0 ? n : 2;
  }();
  return sm_count_override > 0 ? sm_count_override : count;
}

void run(const char* kernel, dim3 grid, dim3 block_shape, size_t shared_bytes,
         const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block_shape.x) * block_shape.y * block_shape.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block_shape.z <= 64,
              "invalid block shape for kernel ", kernel, ": (", block_shape.x, ", ", block_shape.y,
              ", ", block_shape.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "invalid grid for kernel ", kernel, ": (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(shared_bytes <= 48 * 1024, "kernel ", kernel, " asks for ", shared_bytes,
              " bytes of dynamic shared memory (more than 48 KiB needs an opt-in)");
  const std::string name = base_name(kernel);
  {
    std::lock_guard<std::mutex> lock(launched_mutex);
    launched.insert(name);
  }
  struct CostScope {  // ends the launch's cost record, which only a completed launch keeps
    bool completed = false;
    ~CostScope() { cost_launch_end(completed); }
  } cost;
  cost_launch_begin(name.c_str(), grid, block_shape, shared_bytes);
  const FaultHandler handler;
  grid_dim = grid;
  block_dim = block_shape;
  block.body = &body;
  block.error = nullptr;
  block.fibers.resize(threads);
  for (Fiber& f : block.fibers)
    if (f.stack.data == nullptr) f.stack = GuardedRegion(kStackBytes, /*guard_after=*/false);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        block.shared = GuardedRegion(shared_bytes, /*guard_after=*/true);
        std::memset(block.shared.data, 0xFF, shared_bytes);  // NaN in every float type
        for (uint64_t t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.index = dim3(t % block_shape.x, (t / block_shape.x) % block_shape.y,
                         t / (uint64_t(block_shape.x) * block_shape.y));
          f.done = f.waiting = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data;
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_main, 0);
        }
        sigjmp_buf target;
        if (sigsetjmp(target, 1) != 0) {  // a fiber faulted: abandon the block
          fault_target = nullptr;
          const dim3 t = block.current->index;
          thread_idx = nullptr;
          TORCH_CHECK(!uncounted_access(fault_address),
                      "uncounted global-memory access (not through the load / store helpers of "
                      "csrc/cuda/utils.cuh) at ",
                      fault_address, " in kernel ", kernel, ", block (", bx, ", ", by, ", ", bz,
                      "), thread (", t.x, ", ", t.y, ", ", t.z, ")");
          TORCH_CHECK(false, "out-of-bounds access at ", fault_address, " in kernel ", kernel,
                      ", block (", bx, ", ", by, ", ", bz, "), thread (", t.x, ", ", t.y, ", ", t.z,
                      ")");
        }
        fault_target = &target;
        while (!run_round()) {
        }
        fault_target = nullptr;
        thread_idx = nullptr;
        if (block.error) std::rethrow_exception(block.error);
      }
    }
  }
  cost.completed = true;
}

// CPU allocations that end right before an inaccessible page. The data pointer is also the
// deleter's context (raw_allocate, which some ATen kernels use, requires that); the mapping
// it belongs to is looked up.
class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    GuardedRegion region(bytes, /*guard_after=*/true);
    void* data = region.data;
    {
      std::lock_guard<std::mutex> lock(mutex());
      regions().emplace(data, std::move(region));
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static std::vector<TensorMapping> mappings() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    std::lock_guard<std::mutex> lock(mutex());
    std::vector<TensorMapping> result;
    result.reserve(regions().size());
    for (const auto& [data, region] : regions()) {
      char* base = static_cast<char*>(region.base);
      char* guard = base + region.mapped - page;
      result.push_back({base, region.mapped - page, region.data, size_t(guard - region.data)});
    }
    return result;
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::unordered_map<void*, GuardedRegion>& regions() {
    static std::unordered_map<void*, GuardedRegion> r;
    return r;
  }
  static void release(void* data) {
    GuardedRegion region;  // unmapped when it goes out of scope, outside the lock
    std::lock_guard<std::mutex> lock(mutex());
    auto it = regions().find(data);
    if (it == regions().end()) return;
    region = std::move(it->second);
    regions().erase(it);
  }
};

bool guarded = false;

void guard_allocations(bool on) {
  static GuardedAllocator allocator;
  static c10::Allocator* original = c10::GetCPUAllocator();
  // The highest priority: set_allocator calls with a lower one would be ignored.
  c10::SetCPUAllocator(on ? &allocator : original, /*priority=*/255);
  guarded = on;
}

std::vector<TensorMapping> guarded_tensor_mappings() { return GuardedAllocator::mappings(); }

bool allocations_guarded() { return guarded; }

std::vector<std::string> launched_kernels() {
  std::lock_guard<std::mutex> lock(launched_mutex);
  return {launched.begin(), launched.end()};
}

// A deliberately broken kernel, for the test that shows out-of-bounds detection works: each
// thread copies x[i + 1] to out[i], so the last thread reads one element past x's end.
__global__ void read_past_end_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) cuda::store(out + i, cuda::load(x + i + 1));
}

at::Tensor read_past_end(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "a contiguous float tensor");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  FUSEDRES_LAUNCH(static_cast<unsigned>((n + 63) / 64), 64, 0, nullptr, read_past_end_kernel)(
      x.const_data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

// Another, for the test that shows strict cost counting works: out = x, but x is read with a
// plain dereference, not the counted helpers, so counting misses the read and strict counting
// fails the launch.
__global__ void uncounted_read_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) cuda::store(out + i, x[i]);
}

at::Tensor uncounted_read(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "a contiguous float tensor");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  FUSEDRES_LAUNCH(static_cast<unsigned>((n + 63) / 64), 64, 0, nullptr, uncounted_read_kernel)(
      x.const_data_ptr<float>(), out.data_ptr<float>(), n);
  return out;
}

TORCH_LIBRARY_FRAGMENT(fusedres_emulated, m) {
  m.def("read_past_end(Tensor x) -> Tensor", &read_past_end);    // test-only, see above
  m.def("uncounted_read(Tensor x) -> Tensor", &uncounted_read);  // test-only, see above
}

}  // namespace fusedres::emulation

namespace {

PyObject* launched_kernels(PyObject*, PyObject*) {
  const auto names = fusedres::emulation::launched_kernels();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  for (size_t i = 0; i < names.size(); ++i)
    PyList_SET_ITEM(list, i, PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* guard_allocations(PyObject*, PyObject* on) {
  fusedres::emulation::guard_allocations(PyObject_IsTrue(on));
  Py_RETURN_NONE;
}

PyObject* set_emulated_sms(PyObject*, PyObject* n) {
  const long value = PyLong_AsLong(n);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  fusedres::emulation::sm_count_override = value > 0 ? static_cast<int>(value) : 0;
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"launched_kernels", launched_kernels, METH_NOARGS,
     "Names of the emulated CUDA kernels launched so far in this process."},
    {"guard_allocations", guard_allocations, METH_O,
     "guard_allocations(on): allocate CPU tensors before an inaccessible page (on) or as usual "
     "(off), so emulated kernels that access past a tensor's end fail with an error."},
    {"set_emulated_sms", set_emulated_sms, METH_O,
     "set_emulated_sms(n): the launchers size grids for n SMs (0: FUSEDRES_EMULATED_SMS, "
     "default 2)."},
    {"cost_start", fusedres::emulation::py_cost_start, METH_O,
     "cost_start(strict): count each launch's global-memory bytes until cost_stop() "
     "(fusedres._cost.count() calls it). strict: fail a launch whose kernel touches a tensor "
     "without the counted helpers (needs guard_allocations(True))."},
    {"cost_stop", fusedres::emulation::py_cost_stop, METH_NOARGS,
     "cost_stop(): stop counting; the launches counted since cost_start, as dicts."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C_emulated(void) {  // exported (the build hides everything else)
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1,
                                          methods};
  return PyModule_Create(&module_def);
}
