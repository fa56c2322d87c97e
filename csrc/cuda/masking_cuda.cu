// CUDA launcher for forward masking (mdlm/masking.h). Grid: x over rows (grid-stride when
// rows > 2^31 - 1), y over column chunks of one row (for long rows / few rows); inside a block a
// grid-stride loop over the row's columns, coalesced. Every block of a row computes the row
// parameters with the SAME header function as the CPU twin (thread 0, shared memory), so t,
// move chance and xt are bit-identical to csrc/cpu/masking_cpu.cpp (see masking.h for the
// transcendental caveat of the non-loglinear schedules). row_counts: block reduction (warp
// shuffles + shared memory); with one block per row it is stored directly, with several the
// launcher zeroes it (cudaMemsetAsync) and blocks atomicAdd their partial counts. Everything is
// queued on the caller's stream; nothing synchronises.
#include <cuda_runtime.h>

#include "mdlm/masking.h"
#include "mdlm/ops.h"

namespace mdlm {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kColsPerBlock = 4096;  // a column chunk of at least this many elements per block
constexpr unsigned int kMaxGridX = 0x7FFFFFFFu;
constexpr unsigned int kMaxGridY = 65535u;

template <typename T>
__global__ void __launch_bounds__(kThreads)
forward_mask_kernel(const T* __restrict__ x0, T* __restrict__ xt, const float* __restrict__ t_in,
                    float* __restrict__ t_out, float* __restrict__ sigma, float* __restrict__ weight,
                    float* __restrict__ move_chance, int32_t* __restrict__ row_counts, uint64_t rows, uint64_t cols,
                    uint64_t seed, uint64_t offset, T mask_value, MaskParams p, bool atomic_counts) {
  __shared__ float s_mc;
  __shared__ uint32_t s_warp[kWarps];
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned int warp = threadIdx.x >> 5;
  for (uint64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint32_t row = static_cast<uint32_t>(r);
    if (threadIdx.x == 0) {
      const RowParams rp = row_params_for(t_in, seed, offset, row, rows, p);
      s_mc = rp.move_chance;
      if (blockIdx.y == 0) {
        t_out[r] = rp.t;
        sigma[r] = rp.sigma;
        weight[r] = rp.weight;
        move_chance[r] = rp.move_chance;
      }
    }
    __syncthreads();
    const float mc = s_mc;
    const T* src = x0 + r * cols;
    T* dst = xt + r * cols;
    uint32_t count = 0;
    const uint64_t stride = static_cast<uint64_t>(gridDim.y) * kThreads;
    for (uint64_t c = static_cast<uint64_t>(blockIdx.y) * kThreads + threadIdx.x; c < cols; c += stride) {
      const bool m = element_masked(seed, offset, row, static_cast<uint32_t>(c), mc);
      dst[c] = m ? mask_value : src[c];
      count += m ? 1u : 0u;
    }
    // block reduction
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) count += __shfl_down_sync(0xFFFFFFFFu, count, o);
    if (lane == 0) s_warp[warp] = count;
    __syncthreads();
    if (warp == 0) {
      count = lane < kWarps ? s_warp[lane] : 0u;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) count += __shfl_down_sync(0xFFFFFFFFu, count, o);
      if (lane == 0) {
        if (atomic_counts) {
          if (count) atomicAdd(reinterpret_cast<unsigned int*>(row_counts + r), count);
        } else {
          row_counts[r] = static_cast<int32_t>(count);
        }
      }
    }
    __syncthreads();  // s_mc / s_warp are rewritten for the next row
  }
}

template <typename T>
int launch(const T* x0, T* xt, const float* t_in, float* t_out, float* sigma, float* weight, float* move_chance,
           int32_t* row_counts, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, T mask_value,
           const MaskParams& p, cudaStream_t stream) {
  const int64_t chunks = (cols + kColsPerBlock - 1) / kColsPerBlock;
  const unsigned int gy = static_cast<unsigned int>(chunks < 1 ? 1 : (chunks > kMaxGridY ? kMaxGridY : chunks));
  const unsigned int gx = static_cast<unsigned int>(rows > kMaxGridX ? kMaxGridX : rows);
  const bool atomic_counts = gy > 1;
  if (atomic_counts) {
    const cudaError_t e = cudaMemsetAsync(row_counts, 0, static_cast<size_t>(rows) * sizeof(int32_t), stream);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  forward_mask_kernel<T><<<dim3(gx, gy), kThreads, 0, stream>>>(
      x0, xt, t_in, t_out, sigma, weight, move_chance, row_counts, static_cast<uint64_t>(rows),
      static_cast<uint64_t>(cols), seed, offset, mask_value, p, atomic_counts);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int forward_mask_cuda(const void* x0, void* xt, int x_dtype, const float* t_in, float* t_out, float* sigma,
                      float* weight, float* move_chance, int32_t* row_counts, int64_t rows, int64_t cols,
                      uint64_t seed, uint64_t offset, int64_t mask_index, const MaskParams& params, void* stream) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case kInt64:
      return launch(static_cast<const int64_t*>(x0), static_cast<int64_t*>(xt), t_in, t_out, sigma, weight,
                    move_chance, row_counts, rows, cols, seed, offset, static_cast<int64_t>(mask_index), params, s);
    case kInt32:
      return launch(static_cast<const int32_t*>(x0), static_cast<int32_t*>(xt), t_in, t_out, sigma, weight,
                    move_chance, row_counts, rows, cols, seed, offset, static_cast<int32_t>(mask_index), params, s);
    default: return static_cast<int>(cudaErrorInvalidValue);  // validated by the binding already
  }
}

}  // namespace mdlm
