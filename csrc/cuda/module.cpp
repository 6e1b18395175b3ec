// The Python module `fusedres._C_cuda`: importing it registers the CUDA kernels (the
// TORCH_LIBRARY_IMPL blocks of this folder) with the dispatcher. Load fusedres._C first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
