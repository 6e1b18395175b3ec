// Cost counting in the emulation (cost.cpp): what runtime.cpp's launches and the Python module
// share. The counting hooks the kernels call are in cuda_runtime.h.
#pragma once

#include <Python.h>

#include <cstddef>
#include <vector>

#include "cuda_runtime.h"

namespace fusedres::emulation {

// A tensor's memory from the guarded allocator (runtime.cpp): the mapping before its guard
// page [base, base + length), and the tensor's bytes inside it [data, data + bytes).
struct TensorMapping {
  char* base;
  size_t length;
  char* data;
  size_t bytes;
};
std::vector<TensorMapping> guarded_tensor_mappings();
bool allocations_guarded();

// Around each launch (run()). launch_end(false): the launch failed, its record is dropped.
void cost_launch_begin(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes);
void cost_launch_end(bool completed);
// For a fault inside a launch: true if `address` is a tensor's byte that strict counting had
// made inaccessible, i.e. an access that bypassed the counted helpers.
bool uncounted_access(const void* address);

// The Python functions of fusedres._C_emulated (runtime.cpp lists them).
PyObject* py_cost_start(PyObject*, PyObject* strict);
PyObject* py_cost_stop(PyObject*, PyObject*);

}  // namespace fusedres::emulation
