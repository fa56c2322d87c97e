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

int cuda_versions(int* driver, int* runtime) {
  *driver = 0;
  *runtime = 0;
  cudaError_t err = cudaRuntimeGetVersion(runtime);
  cudaError_t err2 = cudaDriverGetVersion(driver);  // 0 when no driver is installed
  if (err != cudaSuccess || err2 != cudaSuccess) cudaGetLastError();
  return static_cast<int>(err != cudaSuccess ? err : err2);
}

namespace {
// Compiled with the same -gencode flags as every kernel of the extension: if the runtime can load an image of
// this kernel for a device (a matching SASS image, or PTX the driver can JIT), it can load all of them.
__global__ void image_probe_kernel() {}
}  // namespace

int cuda_image_check(int device) {
  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, image_probe_kernel);
  }
  if (err != cudaSuccess) cudaGetLastError();  // not sticky: leave no error behind for the caller's next call
  if (prev >= 0) cudaSetDevice(prev);
  return static_cast<int>(err);
}

}  // namespace mdlm
