// CUDA launcher for the fused categorical sampling step (mdlm/sampling.h). One block of
// kSampleLanes = 256 threads per row (grid-stride over rows, grid <= the resident blocks: each block
// computes the Gumbel prefilter table into shared memory once); thread j is lane j of the header's
// reduction contract: it visits v = j, j + 256, ... in increasing order, and the lanes are combined by
// the fixed pairwise tree in shared memory (stride 128 .. 1), exactly as the CPU twin
// (csrc/cpu/sampling_cpu.cpp) does sequentially -> bit-identical tokens and confidences.
// Threshold passes (top-k counts, top-p masses) are block reductions whose result every thread
// reads, so all threads take the same bisection path. Reads the row's logits once per pass (once
// in total without top-k / top-p); writes only tokens and confidences; queued on the caller's
// stream, never synchronises. The device-side offset (params.offset_ptr) is read by every thread at
// the kernel's start (resolve_offset), so a CUDA graph replay uses the value current at replay time.
#include <cuda_runtime.h>

#include "mdlm/ops.h"
#include "mdlm/sampling.h"

namespace mdlm {

namespace {

constexpr int kThreads = kSampleLanes;
constexpr unsigned int kMaxGrid = 1u << 20;

struct Shared {
  SampleAcc acc[kThreads];
  double sum[kThreads];
  uint64_t cnt[kThreads];
  uint32_t lo[kThreads], hi[kThreads], flags[kThreads];
};

// Fixed-tree float64 sum over the block (the header's lane tree); every thread gets the result.
__device__ __forceinline__ double block_tree_sum(double v, Shared& sh) {
  const int j = threadIdx.x;
  sh.sum[j] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (j < stride) sh.sum[j] = dadd(sh.sum[j], sh.sum[j + stride]);
    __syncthreads();
  }
  const double r = sh.sum[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ uint64_t block_count(uint64_t v, Shared& sh) {
  const int j = threadIdx.x;
  sh.cnt[j] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (j < stride) sh.cnt[j] += sh.cnt[j + stride];
    __syncthreads();
  }
  const uint64_t r = sh.cnt[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ uint32_t threshold_key(const T* __restrict__ x, int64_t V, uint32_t mask, const SampleParams& p,
                                  Shared& sh) {
  const int j = threadIdx.x;
  KeyRange kr = key_range_init();
  for (int64_t v = j; v < V; v += kThreads) {
    if (v != mask) key_range_add(kr, load_logit(x, v));
  }
  sh.lo[j] = kr.lo;
  sh.hi[j] = kr.hi;
  sh.flags[j] = kr.flags;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (j < stride) {
      const KeyRange c = key_range_combine(KeyRange{sh.lo[j], sh.hi[j], sh.flags[j]},
                                           KeyRange{sh.lo[j + stride], sh.hi[j + stride], sh.flags[j + stride]});
      sh.lo[j] = c.lo;
      sh.hi[j] = c.hi;
      sh.flags[j] = c.flags;
    }
    __syncthreads();
  }
  const KeyRange all{sh.lo[0], sh.hi[0], sh.flags[0]};
  __syncthreads();
  if (all.flags != 0u) return 0u;
  uint32_t lo = all.lo, hi = all.hi;
  if (use_top_k(p)) {
    const uint64_t k = static_cast<uint64_t>(p.top_k);
    while (lo < hi) {
      const uint32_t mid = bisect_mid(lo, hi);
      uint64_t count = 0;
      for (int64_t v = j; v < V; v += kThreads) {
        if (v != mask && float_key(load_logit(x, v)) > mid) ++count;
      }
      bisect_update(lo, hi, mid, block_count(count, sh) < k);
    }
  }
  const uint32_t keep_k = lo;
  if (!use_top_p(p)) return keep_k;
  const float x_max = key_float(all.hi);
  double z = 0.0;
  for (int64_t v = j; v < V; v += kThreads) {
    const float xv = load_logit(x, v);
    if (v != mask && float_key(xv) >= keep_k) z = dadd(z, top_p_weight(xv, x_max, p.inv_t));
  }
  const double target = dmul(p.top_p, block_tree_sum(z, sh));
  lo = keep_k;
  hi = all.hi;
  while (lo < hi) {
    const uint32_t mid = bisect_mid(lo, hi);
    double m = 0.0;
    for (int64_t v = j; v < V; v += kThreads) {
      const float xv = load_logit(x, v);
      if (v != mask && float_key(xv) > mid) m = dadd(m, top_p_weight(xv, x_max, p.inv_t));
    }
    bisect_update(lo, hi, mid, block_tree_sum(m, sh) < target);
  }
  return lo;
}

// Maximum over the warp (all 32 lanes converged).
__device__ __forceinline__ double warp_max(double c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double d = __shfl_xor_sync(0xFFFFFFFFu, c, o);
    c = d > c ? d : c;
  }
  return c;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_step_kernel(const T* __restrict__ logits, const float* __restrict__ t, const float* __restrict__ s,
                   const int64_t* __restrict__ row_ids, int64_t* __restrict__ tokens, float* __restrict__ conf,
                   int64_t N, SampleParams params) {
  const SampleParams p = resolve_offset(params);  // the effective offset, as the CPU twin computes it
  __shared__ Shared sh;
  __shared__ float g_hi[kGumbelBuckets];  // the Gumbel prefilter table, once per block
  const int j = threadIdx.x;
  const int64_t V = p.vocab;
  const uint32_t mask = static_cast<uint32_t>(p.mask_index);
  const bool filter = use_top_k(p) || use_top_p(p);
  if (!p.greedy) {
    for (int b = j; b < kGumbelBuckets; b += kThreads) g_hi[b] = gumbel_bound(static_cast<uint32_t>(b));
  }
  __syncthreads();
  const int64_t n_iter = (V + kThreads - 1) / kThreads;  // the same for every thread: warps stay converged
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const T* x = logits + i * V;
    uint32_t flags = 0u;
    const uint32_t row_key = row_key_of(row_ids, i, flags);
    const uint32_t keep = filter ? threshold_key(x, V, mask, p, sh) : 0u;
    SampleAcc a = sample_acc_init();
    double cut = -inf64();  // shared by the 32 lanes of the warp (GUMBEL PREFILTER)
    for (int64_t k = 0; k < n_iter; ++k) {
      const int64_t v = j + k * kThreads;  // lane j: v = j, j + 256, ... in increasing order
      const double before = cut;
      if (v < V && v != mask) {
        sample_acc_add(a, load_logit(x, v), static_cast<uint32_t>(v), keep, p, row_key, g_hi, cut);
      }
      if (!p.greedy && __any_sync(0xFFFFFFFFu, cut > before)) cut = warp_max(cut);
    }
    sh.acc[j] = a;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (j < stride) sh.acc[j] = sample_acc_combine(sh.acc[j], sh.acc[j + stride], p.inv_t);
      __syncthreads();
    }
    if (j == 0) {
      const float ti = p.greedy ? 0.0f : t[i];
      const float si = p.greedy ? 0.0f : s[i];
      float c[3];
      tokens[i] = sample_finalize(sh.acc[0], ti, si, row_key, flags, p, c);
      conf[3 * i + 0] = c[0];
      conf[3 * i + 1] = c[1];
      conf[3 * i + 2] = c[2];
    }
    __syncthreads();  // sh is rewritten for the next row
  }
}

// Grid: at most the blocks the device holds at once (each block fills the 16 KB prefilter table once,
// then strides over rows), and at most N. Any grid gives the same results (one block per row).
template <typename T>
int launch(const T* logits, const float* t, const float* s, const int64_t* row_ids, int64_t* tokens, float* conf,
           int64_t N, const SampleParams& p, cudaStream_t stream) {
  int64_t cap = int64_t(kMaxGrid);
  if (!p.greedy) {
    int dev = 0, sms = 0, per_sm = 0;
    const bool ok = cudaGetDevice(&dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
                    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_step_kernel<T>, kThreads, 0) ==
                        cudaSuccess;
    if (!ok) {
      (void)cudaGetLastError();  // a failed query only falls back to the plain grid
    } else if (sms > 0 && per_sm > 0) {
      cap = int64_t(sms) * int64_t(per_sm);
    }
  }
  const int64_t g = N < cap ? N : cap;
  const unsigned int grid = static_cast<unsigned int>(g < int64_t(kMaxGrid) ? g : int64_t(kMaxGrid));
  sample_step_kernel<T><<<grid, kThreads, 0, stream>>>(logits, t, s, row_ids, tokens, conf, N, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int sample_step_cuda(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params, void* stream) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch(static_cast<const float*>(logits), t, s, row_ids, tokens, conf, rows, params, st);
    case kBFloat16:
      return launch(static_cast<const uint16_t*>(logits), t, s, row_ids, tokens, conf, rows, params, st);
    default: return static_cast<int>(cudaErrorInvalidValue);  // validated by the binding already
  }
}

}  // namespace mdlm
