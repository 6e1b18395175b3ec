// The CUDA source, compiled as host C++ for the emulation build (cuda_runtime.h).
#include "../cuda/conv_bias_act.cu"
