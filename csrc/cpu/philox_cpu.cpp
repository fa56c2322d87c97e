// CPU twin of csrc/cuda/philox_cuda.cu: same header math, OpenMP over rows.
#include <stdexcept>

#include "mdlm/ops.h"
#include "mdlm/philox.h"

namespace mdlm {

namespace {

template <typename T>
struct UniformFrom;

template <>
struct UniformFrom<double> {
  static inline double get(const U32x4& w) { return uniform53(w.x, w.y); }
};

template <>
struct UniformFrom<float> {
  static inline float get(const U32x4& w) { return uniform24(w.x); }
};

template <typename T>
void fill(T* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols > 16384)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* row_out = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const U32x4 w = philox_for_element(seed, offset, static_cast<uint32_t>(r), static_cast<uint32_t>(c));
      row_out[c] = UniformFrom<T>::get(w);
    }
  }
}

}  // namespace

void philox_uniform_cpu(void* out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset,
                        int out_dtype, const int64_t* offset_ptr) {
  if (rows == 0 || cols == 0) return;
  offset = effective_offset(offset, offset_ptr);  // the same header function as the CUDA kernel
  switch (out_dtype) {
    case kFloat64: fill(static_cast<double*>(out), rows, cols, seed, offset); break;
    case kFloat32: fill(static_cast<float*>(out), rows, cols, seed, offset); break;
    default: throw std::invalid_argument("philox_uniform_cpu: unsupported dtype");
  }
}

void philox4x32_cpu(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  const U32x4 w = philox4x32_10(U32x4{ctr[0], ctr[1], ctr[2], ctr[3]}, key[0], key[1]);
  out[0] = w.x;
  out[1] = w.y;
  out[2] = w.z;
  out[3] = w.w;
}

}  // namespace mdlm
