// CPU: out = relu(input + residual), one pass of the shared normalize kernel
// (../normalize_act.h; the kernel lives in batch_norm_apply.cpp).
#include <torch/library.h>

#include "../normalize_act.h"

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("add_relu", &fusedres::add_relu_op<fusedres::cpu::normalize_act>);
}
