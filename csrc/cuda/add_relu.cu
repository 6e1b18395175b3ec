// CUDA: out = relu(input + residual), one pass of the shared normalize kernel
// (../normalize_act.h; the kernel lives in batch_norm_apply.cu).
#include <torch/library.h>

#include "../normalize_act.h"

FUSEDRES_LIBRARY_IMPL(FUSEDRES_CUDA_KEY, m) {
  m.impl("add_relu", &fusedres::add_relu_op<fusedres::cuda::normalize_act>);
}
