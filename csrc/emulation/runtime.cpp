// The emulated CUDA runtime (see cuda_runtime.h) and the Python module fusedres._C_emulated:
// importing it registers the fusedres_emulated library (schemas, compositions and the CUDA
// kernels of csrc/cuda compiled for the CPU). Test-only: the `cuda-emulated` backend.
#include <Python.h>
#include <ucontext.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace fusedres::emulation {

thread_local dim3 block_idx, block_dim, grid_dim;
thread_local const dim3* thread_idx = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
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
  std::vector<unsigned char> shared;
};

thread_local Block block;

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

unsigned char* dynamic_shared() { return block.shared.data(); }

int sm_count() {
  static const int count = [] {
    const char* env = std::getenv("FUSEDRES_EMULATED_SMS");
    const int n = env ? std::atoi(env) : 2;
    return n > 0 ? n : 2;
  }();
  return count;
}

void run(const char* kernel, dim3 grid, dim3 block_shape, size_t shared_bytes,
         const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block_shape.x) * block_shape.y * block_shape.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block_shape.z <= 64,
              "invalid block shape for kernel ", kernel, ": (", block_shape.x, ", ",
              block_shape.y, ", ", block_shape.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "invalid grid for kernel ", kernel, ": (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(shared_bytes <= 48 * 1024, "kernel ", kernel, " asks for ", shared_bytes,
              " bytes of dynamic shared memory (more than 48 KiB needs an opt-in)");
  {
    std::lock_guard<std::mutex> lock(launched_mutex);
    launched.insert(base_name(kernel));
  }
  grid_dim = grid;
  block_dim = block_shape;
  block.body = &body;
  block.error = nullptr;
  block.fibers.resize(threads);
  for (Fiber& f : block.fibers)
    if (f.stack.empty()) f.stack.resize(kStackBytes);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        block.shared.assign(shared_bytes + 16, 0xFF);
        for (uint64_t t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.index = dim3(t % block_shape.x, (t / block_shape.x) % block_shape.y,
                         t / (uint64_t(block_shape.x) * block_shape.y));
          f.done = f.waiting = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_main, 0);
        }
        while (!run_round()) {
        }
        thread_idx = nullptr;
        if (block.error) std::rethrow_exception(block.error);
      }
    }
  }
}

std::vector<std::string> launched_kernels() {
  std::lock_guard<std::mutex> lock(launched_mutex);
  return {launched.begin(), launched.end()};
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

PyMethodDef methods[] = {
    {"launched_kernels", launched_kernels, METH_NOARGS,
     "Names of the emulated CUDA kernels launched so far in this process."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C_emulated(void) {  // exported (the build hides everything else)
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1,
                                          methods};
  return PyModule_Create(&module_def);
}
