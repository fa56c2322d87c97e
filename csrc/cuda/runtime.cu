// Small CUDA runtime wrappers so that bindings.cpp does not need CUDA headers. Never throw.
#include <cuda_runtime.h>

#include "mdlm/ops.h"

namespace mdlm {

int cuda_device_count(int* count) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error: no driver / no device is not fatal
    n = 0;
  }
  *count = n;
  return static_cast<int>(err);
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace mdlm
