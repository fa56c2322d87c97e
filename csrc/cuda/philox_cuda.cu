// CUDA launcher for philox_uniform: one thread per element, grid-stride loop, on the caller's
// stream. Same header math as the CPU twin (csrc/cpu/philox_cpu.cpp) -> bit-identical output.
// offset_ptr (device memory, or nullptr): each thread adds it to the host offset when the kernel
// runs (effective_offset), so a CUDA graph replay sees the value current at replay time.
#include <cuda_runtime.h>

#include "mdlm/ops.h"
#include "mdlm/philox.h"

namespace mdlm {

namespace {

template <typename T>
__device__ __forceinline__ T uniform_from(const U32x4& w);

template <>
__device__ __forceinline__ double uniform_from<double>(const U32x4& w) { return uniform53(w.x, w.y); }

template <>
__device__ __forceinline__ float uniform_from<float>(const U32x4& w) { return uniform24(w.x); }

template <typename T>
__global__ void philox_uniform_kernel(T* __restrict__ out, uint64_t n, uint64_t cols, uint64_t seed,
                                      uint64_t host_offset, const int64_t* __restrict__ offset_ptr) {
  const uint64_t offset = effective_offset(host_offset, offset_ptr);
  const uint64_t stride = static_cast<uint64_t>(blockDim.x) * gridDim.x;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t r = i / cols;
    const uint64_t c = i - r * cols;
    const U32x4 w = philox_for_element(seed, offset, static_cast<uint32_t>(r), static_cast<uint32_t>(c));
    out[i] = uniform_from<T>(w);
  }
}

template <typename T>
int launch(T* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, const int64_t* offset_ptr,
           cudaStream_t stream) {
  const uint64_t n = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols);
  constexpr int kThreads = 256;
  const uint64_t want = (n + kThreads - 1) / kThreads;
  const unsigned int blocks = static_cast<unsigned int>(want < (1u << 20) ? want : (1u << 20));
  philox_uniform_kernel<T><<<blocks, kThreads, 0, stream>>>(out, n, static_cast<uint64_t>(cols), seed, offset,
                                                            offset_ptr);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int philox_uniform_cuda(void* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset,
                        int out_dtype, const int64_t* offset_ptr, void* stream) {
  if (rows == 0 || cols == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case kFloat64: return launch(static_cast<double*>(out), rows, cols, seed, offset, offset_ptr, s);
    case kFloat32: return launch(static_cast<float*>(out), rows, cols, seed, offset, offset_ptr, s);
    default: return static_cast<int>(cudaErrorInvalidValue);  // validated by the binding already
  }
}

}  // namespace mdlm
