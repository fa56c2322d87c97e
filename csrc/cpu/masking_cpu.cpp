// CPU twin of csrc/cuda/masking_cuda.cu: the same header functions (mdlm/masking.h) per row and
// per element, OpenMP over rows.
#include <stdexcept>

#include "mdlm/masking.h"
#include "mdlm/ops.h"

namespace mdlm {

namespace {

template <typename T>
void mask_rows(const T* x0, T* xt, const float* t_in, float* t_out, float* sigma, float* weight,
               float* move_chance, int32_t* row_counts, int64_t rows, int64_t cols, uint64_t seed,
               uint64_t offset, T mask_value, const MaskParams& p) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (rows * (cols + 1) > 16384)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t row = static_cast<uint32_t>(r);
    const RowParams rp = row_params_for(t_in, seed, offset, row, static_cast<uint64_t>(rows), p);
    t_out[r] = rp.t;
    sigma[r] = rp.sigma;
    weight[r] = rp.weight;
    move_chance[r] = rp.move_chance;
    const T* src = x0 + r * cols;
    T* dst = xt + r * cols;
    int64_t count = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const bool m = element_masked(seed, offset, row, static_cast<uint32_t>(c), rp.move_chance);
      dst[c] = m ? mask_value : src[c];
      count += m;
    }
    // cols < 2^32; a row of more than 2^31 - 1 masked positions would not fit int32: the binding
    // refuses cols > INT32_MAX for that reason.
    row_counts[r] = static_cast<int32_t>(count);
  }
}

}  // namespace

void forward_mask_cpu(const void* x0, void* xt, int x_dtype, const float* t_in, float* t_out, float* sigma,
                      float* weight, float* move_chance, int32_t* row_counts, int64_t rows, int64_t cols,
                      uint64_t seed, uint64_t offset, int64_t mask_index, const MaskParams& params) {
  if (rows == 0) return;
  switch (x_dtype) {
    case kInt64:
      mask_rows(static_cast<const int64_t*>(x0), static_cast<int64_t*>(xt), t_in, t_out, sigma, weight, move_chance,
                row_counts, rows, cols, seed, offset, static_cast<int64_t>(mask_index), params);
      break;
    case kInt32:
      mask_rows(static_cast<const int32_t*>(x0), static_cast<int32_t*>(xt), t_in, t_out, sigma, weight, move_chance,
                row_counts, rows, cols, seed, offset, static_cast<int32_t>(mask_index), params);
      break;
    default: throw std::invalid_argument("forward_mask_cpu: unsupported dtype");
  }
}

}  // namespace mdlm
