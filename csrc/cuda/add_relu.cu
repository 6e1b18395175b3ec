// CUDA: out = relu(input + residual), one vectorised pass (the epilogue of normalize_act.cuh).
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "normalize_act.cuh"
#include "utils.cuh"

namespace fusedres::cuda {
namespace {

at::Tensor add_relu(const at::Tensor& input_, const at::Tensor& residual) {
  check_input(input_, "input");
  check_same(residual, input_, "residual");
  const at::Tensor input = dense_for_kernels(input_);
  at::Tensor out = at::empty_like(input);
  normalize_act(input, {.residual = match_layout(residual, input), .relu = true}, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("add_relu", &add_relu);
}

}  // namespace fusedres::cuda
