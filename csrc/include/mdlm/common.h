// mdlm-kernels: framework-free definitions shared by host (C++) and device (CUDA) code.
// No torch headers: Python passes raw pointers, sizes, dtype codes and the CUDA stream.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MDLM_HD __host__ __device__ __forceinline__
#else
#define MDLM_HD inline
#endif

#ifndef MDLM_WITH_CUDA
#define MDLM_WITH_CUDA 0
#endif

namespace mdlm {

// dtype codes shared with Python (mdlm_kernels/_dtypes.py must match).
enum DType : int {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kInt64 = 4,
  kInt32 = 5,
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kFloat64: return "float64";
    case kInt64: return "int64";
    case kInt32: return "int32";
    default: return "unknown";
  }
}

// ---- bit casts usable on host and device --------------------------------------------------
MDLM_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MDLM_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- bfloat16 <-> float32 on raw 16-bit patterns -----------------------------------------
// bf16 is the upper half of an fp32: widening is exact.
MDLM_HD float bf16_bits_to_float(uint16_t b) { return bits_as_float(static_cast<uint32_t>(b) << 16); }

// Round-to-nearest-even narrowing (matches torch's float -> bfloat16); NaN stays a quiet NaN.
MDLM_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign, force quiet bit
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

}  // namespace mdlm
