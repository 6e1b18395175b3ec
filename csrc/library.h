// The op library the sources register into. Normally `fusedres`, with the CUDA kernels on the
// CUDA dispatch key. The emulation build (csrc/emulation, FUSEDRES_CUDA_EMULATION) compiles
// the same schemas, compositions and CUDA sources a second time into `fusedres_emulated`,
// with the CUDA kernels on the CPU key: they then run on CPU tensors.
#pragma once

#include <c10/macros/Macros.h>
#include <torch/library.h>

#ifdef FUSEDRES_CUDA_EMULATION
#define FUSEDRES_LIBRARY fusedres_emulated
#define FUSEDRES_CUDA_KEY CPU
#else
#define FUSEDRES_LIBRARY fusedres
#define FUSEDRES_CUDA_KEY CUDA
#endif

// TORCH_LIBRARY pastes its namespace unexpanded: expand FUSEDRES_LIBRARY first.
#define FUSEDRES_LIBRARY_DEF_(ns, m) TORCH_LIBRARY(ns, m)
#define FUSEDRES_LIBRARY_DEF(m) FUSEDRES_LIBRARY_DEF_(FUSEDRES_LIBRARY, m)
#define FUSEDRES_LIBRARY_IMPL(key, m) TORCH_LIBRARY_IMPL(FUSEDRES_LIBRARY, key, m)
// "fusedres::name" (or "fusedres_emulated::name"): an op of this library, for the dispatcher.
#define FUSEDRES_OP(name) C10_STRINGIZE(FUSEDRES_LIBRARY) "::" name
