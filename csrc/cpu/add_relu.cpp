// CPU: out = relu(input + residual), one pass (the shared epilogue of normalize_act.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common.h"
#include "normalize_act.h"

namespace fusedres::cpu {
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

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("add_relu", &add_relu);
}

}  // namespace fusedres::cpu
