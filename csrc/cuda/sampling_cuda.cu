// CUDA launcher for the fused categorical sampling step (mdlm/sampling.h): one block of 8 warps per row
// (grid-stride over rows). Pass 1: warp w takes chunks c = w, w + 8, ... (lane l: columns 512c + 32k + l,
// k = 0..15: each load instruction of the warp reads 32 consecutive columns), computes the chunk maximum (float32
// butterfly, NaN-propagating: it also flags bad logits), the lanes' float32 weights and sums, and the chunk sums
// (float32 butterflies) into shared memory; the row maximum, the top two and the float64 mass of the maximum's
// chunk (pass 1b, warp 0: 512 columns), the chunk scaling, the group scans over chunks, the two uniforms and the
// choice of the chunk follow (thread 0 walks the group totals: n_chunks / 32 steps); pass 2: warp 0 re-reads the chosen chunk (512
// columns) and picks the column by its float64 prefix in column order. Top-k / top-p: the radix descent with
// shared-memory histograms (integer atomics: exact, order-free; 32-bit counts for top-k, 64-bit fixed-point
// masses for top-p), the bin picked by warp 0. Exactly the CPU twin's arithmetic (csrc/cpu/sampling_cpu.cpp) ->
// bit-identical tokens and confidences. Reads a row's logits once plus two chunks (plus the threshold passes when
// top-k / top-p are on); writes only tokens and confidences; queued on the caller's stream, never synchronises.
// The device-side offset (params.offset_ptr) is read by every thread at the kernel's start (resolve_offset), so a
// CUDA graph replay uses the value current at replay time.
#include <cuda_runtime.h>

#include "mdlm/ops.h"
#include "mdlm/sampling.h"

namespace mdlm {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpLanes;  // 256
constexpr unsigned int kMaxGrid = 1u << 20;
constexpr unsigned int kFull = 0xFFFFFFFFu;

__device__ __forceinline__ double warp_scan_incl(double x, int lane) {  // Hillis-Steele, as lane_scan
#pragma unroll
  for (int o = 1; o < kWarpLanes; o <<= 1) {
    const double y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x = dadd(x, y);
  }
  return x;
}

__device__ __forceinline__ double warp_butterfly(double x) {  // as lane_butterfly
#pragma unroll
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) x = dadd(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float warp_max(float x) {  // the threshold passes' row maximum (no NaN there)
#pragma unroll
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(kFull, x, o);
    x = y > x ? y : x;
  }
  return x;
}

__device__ __forceinline__ float warp_max_nan(float x) {  // as butterfly_max32 of the CPU twin
#pragma unroll
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) x = max_nan(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum32(float x) {  // as butterfly_sum32 of the CPU twin
#pragma unroll
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) x = fadd_nc(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ Top2 warp_top2(Top2 a) {
#pragma unroll
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) {
    Top2 b;
    b.x1 = __shfl_xor_sync(kFull, a.x1, o);
    b.x2 = __shfl_xor_sync(kFull, a.x2, o);
    b.i1 = __shfl_xor_sync(kFull, a.i1, o);
    a = top2_combine(a, b);
  }
  return a;
}

// Shared state of one row (static part); the chunk tables / histograms live in dynamic shared memory.
struct RowShared {
  Top2 top2[kWarps];
  Top2 row;                // the row's top two (pass 1b)
  float w2[kChunkCols];     // pass 2: the chosen chunk's weights, w2[32 k + l] (keeps them out of registers)
  uint32_t flags[kWarps];
  uint32_t prefix;
  uint64_t above;
  double target;
  int64_t chunk;   // the chosen chunk (-1: MASK or invalid)
  double tau;
  int64_t token;
  float x_max[kWarps];
};

// Warp 0 picks the radix bin: the highest bin b with above + sum_{b' > b} hist <= ... (see threshold_key of the CPU
// twin: the descending walk stops at the first b with above + hist[b] >= need). Integer sums: any order is exact.
template <bool MASS, typename Hist>
__device__ void pick_bin(const Hist* hist, int bins, uint64_t& above, double need_d, uint64_t need_k, int lane,
                         int& pick) {
  // lane l owns bins [hi_l - per + 1, hi_l] counted from the top: lane 0 the highest
  const int per = bins / kWarpLanes;
  const int top = bins - 1 - lane * per;
  uint64_t mine = 0;
  for (int j = 0; j < per; ++j) mine += hist[top - j];
  // exclusive prefix (from the top) over lanes: integer, so the scan's order does not matter
  uint64_t incl = mine;
#pragma unroll
  for (int o = 1; o < kWarpLanes; o <<= 1) {
    const uint64_t y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += y;
  }
  const uint64_t excl = incl - mine;
  // the first lane (from the top) whose range reaches the need
  const bool reach = MASS ? static_cast<double>(above + incl) >= need_d : (above + incl) >= need_k;
  const unsigned int ballot = __ballot_sync(kFull, reach);
  const int owner = ballot ? (__ffs(ballot) - 1) : (kWarpLanes - 1);
  int b = -1;
  uint64_t a = above + excl;
  if (lane == owner) {
    b = top - per + 1;  // default: the owner's lowest bin (reached when nothing above it meets the need)
    for (int j = 0; j < per; ++j) {
      const int bj = top - j;
      const bool ok = MASS ? static_cast<double>(a + hist[bj]) >= need_d : (a + hist[bj]) >= need_k;
      if (ok && bj > 0) {
        b = bj;
        break;
      }
      if (bj == 0) {
        b = 0;
        break;
      }
      a += hist[bj];
    }
  }
  pick = __shfl_sync(kFull, b, owner);
  above = __shfl_sync(kFull, a, owner);
}

template <typename T>
__device__ uint32_t threshold_key(const T* __restrict__ x, int64_t V, uint32_t mask, const SampleParams& p,
                                  void* hist_mem, RowShared& rs, uint32_t& flags) {
  uint32_t* counts = static_cast<uint32_t*>(hist_mem);  // top-k: exact counts (< 2^19)
  uint64_t* hist = static_cast<uint64_t*>(hist_mem);    // top-p: fixed-point masses
  const int j = threadIdx.x, lane = j % kWarpLanes, warp = j / kWarpLanes;
  uint32_t keep = 0u;
  float x_max = -inf32();
  bool scanned = false;
  if (use_top_k(p)) {
    const uint64_t k = static_cast<uint64_t>(p.top_k);
    uint32_t prefix = 0u;
    if (j == 0) rs.above = 0u;
    for (int level = 0; level < kRadixLevels; ++level) {
      for (int b = j; b < kRadixBins; b += kThreads) counts[b] = 0u;
      __syncthreads();
      const uint32_t pm = radix_prefix_mask(level);
      uint32_t f = 0u;
      for (int64_t v = j; v < V; v += kThreads) {
        if (v == int64_t(mask)) continue;
        const float xv = load_logit(x, v);
        if (bad_logit(xv)) {
          f |= kFlagBadLogit;
          continue;
        }
        if (level == 0) x_max = xv > x_max ? xv : x_max;
        const uint32_t key = float_key(xv);
        if ((key & pm) != prefix) continue;
        atomicAdd(&counts[radix_digit(key, level)], 1u);
      }
      f = __reduce_or_sync(kFull, f);
      if (lane == 0) rs.flags[warp] = f;
      __syncthreads();
      uint32_t all = 0u;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) all |= rs.flags[w];
      if (all != 0u) {
        flags |= all;
        __syncthreads();
        return 0u;
      }
      if (warp == 0) {
        uint64_t above = rs.above;
        int b = 0;
        pick_bin<false>(counts, radix_bins(level), above, 0.0, k, lane, b);
        if (lane == 0) {
          rs.above = above;
          rs.prefix = prefix | (static_cast<uint32_t>(b) << radix_shift(level));
        }
      }
      __syncthreads();
      prefix = rs.prefix;
      __syncthreads();
    }
    keep = prefix;
    scanned = true;
  }
  if (!use_top_p(p)) return keep;
  if (!scanned) {
    uint32_t f = 0u;
    for (int64_t v = j; v < V; v += kThreads) {
      if (v == int64_t(mask)) continue;
      const float xv = load_logit(x, v);
      if (bad_logit(xv)) {
        f |= kFlagBadLogit;
        continue;
      }
      x_max = xv > x_max ? xv : x_max;
    }
    f = __reduce_or_sync(kFull, f);
    if (lane == 0) rs.flags[warp] = f;
  }
  x_max = warp_max(x_max);
  if (lane == 0) rs.x_max[warp] = x_max;
  __syncthreads();
  uint32_t all = 0u;
  x_max = -inf32();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (!scanned) all |= rs.flags[w];
    x_max = rs.x_max[w] > x_max ? rs.x_max[w] : x_max;
  }
  __syncthreads();
  if (all != 0u) {
    flags |= all;
    return 0u;
  }
  if (x_max == -inf32()) return keep;
  uint32_t prefix = 0u;
  if (j == 0) rs.above = 0u;
  for (int level = 0; level < kRadixLevels; ++level) {
    for (int b = j; b < kRadixBins; b += kThreads) hist[b] = 0u;
    __syncthreads();
    const uint32_t pm = radix_prefix_mask(level);
    for (int64_t v = j; v < V; v += kThreads) {
      if (v == int64_t(mask)) continue;
      const float xv = load_logit(x, v);
      if (bad_logit(xv)) continue;
      const uint32_t key = float_key(xv);
      if (key < keep || (key & pm) != prefix) continue;
      // 64-bit shared atomics are compare-and-swap loops on sm_80 / sm_90: skip the zero masses (w < 2^-41, i.e.
      // d < -28.4: most of a peaked row), which change no sum
      const uint64_t mass = mass_fixed(top_p_weight(xv, x_max, p.inv_t));
      if (mass != 0u) {
        atomicAdd(reinterpret_cast<unsigned long long*>(&hist[radix_digit(key, level)]),
                  static_cast<unsigned long long>(mass));
      }
    }
    __syncthreads();
    if (warp == 0) {
      if (level == 0) {  // Z: the level-0 histogram's total
        uint64_t z = 0;
        for (int b = lane; b < kRadixBins; b += kWarpLanes) z += hist[b];
#pragma unroll
        for (int o = kWarpLanes / 2; o > 0; o >>= 1) z += __shfl_xor_sync(kFull, z, o);
        if (lane == 0) rs.target = dmul(p.top_p, static_cast<double>(z));
        __syncwarp();
      }
      uint64_t above = rs.above;
      int b = 0;
      pick_bin<true>(hist, radix_bins(level), above, rs.target, 0u, lane, b);
      if (lane == 0) {
        rs.above = above;
        rs.prefix = prefix | (static_cast<uint32_t>(b) << radix_shift(level));
      }
    }
    __syncthreads();
    prefix = rs.prefix;
    __syncthreads();
  }
  return prefix > keep ? prefix : keep;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, 4)
sample_step_kernel(const T* __restrict__ logits, const float* __restrict__ t, const float* __restrict__ s,
                   const int64_t* __restrict__ row_ids, int64_t* __restrict__ tokens, float* __restrict__ conf,
                   int64_t N, SampleParams params) {
  const SampleParams p = resolve_offset(params);  // the effective offset, as the CPU twin computes it
  extern __shared__ unsigned char dyn[];          // chunk tables (or the radix histogram before them)
  __shared__ RowShared rs;
  const int j = threadIdx.x, lane = j % kWarpLanes, warp = j / kWarpLanes;
  const int64_t V = p.vocab;
  const uint32_t mask = static_cast<uint32_t>(p.mask_index);
  const int64_t nc = (V + kChunkCols - 1) / kChunkCols;
  const int64_t ng = (nc + kWarpLanes - 1) / kWarpLanes;
  // dynamic layout: S[ng * 32] (double), H[ng * 32] (double), G[ng + 1] (double), M[nc] (float)
  double* S = reinterpret_cast<double*>(dyn);
  double* H = S + ng * kWarpLanes;
  double* G = H + ng * kWarpLanes;
  float* M = reinterpret_cast<float*>(G + ng + 1);
  const bool filter = use_top_k(p) || use_top_p(p);
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const T* x = logits + i * V;
    uint32_t flags = 0u;
    const uint32_t row_key = row_key_of(row_ids, i, flags);
    const uint32_t keep = filter ? threshold_key(x, V, mask, p, dyn, rs, flags) : 0u;
    // pass 1: chunk statistics (per element: one load, one NaN-propagating max, weight32 and two sums)
    Top2 chunks = top2_init();  // warp-uniform
    uint32_t f = 0u;
    const ChunkGrid grid = chunk_grid(V, mask, keep);
    const int nci = static_cast<int>(nc);
    for (int c = warp; c < nci; c += kWarps) {
      float xs[kLaneCols], w[kLaneCols], sl, hl;
      lane_load(x, c, lane, V, mask, keep, grid.full(c), xs);
      const float m = fadd_nc(warp_max_nan(lane_max(xs)), 0.0f);  // -0 -> +0
      lane_weights<kEntropy>(xs, m, p.scale2, w, sl, hl);
      sl = warp_sum32(sl);
      if (kEntropy) hl = warp_sum32(hl);
      if (lane == 0) {
        S[c] = static_cast<double>(sl);
        H[c] = chunk_h_nats(hl);
        M[c] = m;
      }
      if (bad_logit(m)) f |= kFlagBadLogit;
      top2_add(chunks, m, static_cast<uint32_t>(c));
    }
    for (int64_t c = nc + j; c < ng * kWarpLanes; c += kThreads) {  // the last group's empty lanes
      S[c] = 0.0;
      H[c] = 0.0;
    }
    if (lane == 0) {
      rs.top2[warp] = chunks;
      rs.flags[warp] = f;
    }
    __syncthreads();
    chunks = rs.top2[0];
    for (int w = 1; w < kWarps; ++w) {
      chunks = top2_combine(chunks, rs.top2[w]);
      flags |= rs.flags[w];
    }
    flags |= rs.flags[0];
    const float ti = p.greedy ? 0.0f : t[i];
    const float si = p.greedy ? 0.0f : s[i];
    flags |= time_flags(ti, si, p.greedy);
    if (chunks.x1 == -inf32()) flags |= kFlagEmpty;
    if (flags != 0u) {  // the same value in every thread
      if (j == 0) {
        float c3[3];
        nan_confidences(c3);
        tokens[i] = -1;
        conf[3 * i + 0] = c3[0];
        conf[3 * i + 1] = c3[1];
        conf[3 * i + 2] = c3[2];
      }
      __syncthreads();
      continue;
    }
    // pass 1b (warp 0): the first chunk holding the maximum: its top two, and its mass in float64 (MAXIMUM'S CHUNK)
    const float mrow = chunks.x1;
    const int cm = static_cast<int>(chunks.i1);
    if (warp == 0) {
      float xs[kLaneCols], w[kLaneCols], sl, hl;
      lane_load(x, cm, lane, V, mask, keep, grid.full(cm), xs);
      Top2 in_chunk = top2_init();
      lane_top2(xs, cm, lane, in_chunk);
      in_chunk = warp_top2(in_chunk);
      lane_weights<false>(xs, mrow, p.scale2, w, sl, hl);
      const double Tc = warp_butterfly(lane_total64(w));
      if (lane == 0) {
        rs.row = row_top2(chunks, in_chunk);
        S[cm] = Tc;
      }
    }
    __syncthreads();
    // chunks scaled to the row maximum; groups of 32 chunks scanned by the warps
    for (int64_t g = warp; g < ng; g += kWarps) {
      const int64_t c = g * kWarpLanes + lane;
      double e = 0.0, Sc = 0.0, Hc = 0.0;
      if (c < nc) chunk_scaled(M[c], S[c], H[c], mrow, p.inv_t_w, e, Sc, Hc);
      const double hg = warp_butterfly(Hc);
      Sc = warp_scan_incl(Sc, lane);
      S[c] = Sc;
      if (lane == 0) H[g * kWarpLanes] = hg;  // the group's H total (H[c] is read above, before this write)
    }
    __syncthreads();
    if (j == 0) {
      G[0] = 0.0;
      double Hrow = 0.0;
      for (int64_t g = 0; g < ng; ++g) {
        G[g + 1] = dadd(G[g], S[g * kWarpLanes + kWarpLanes - 1]);
        Hrow = g == 0 ? H[0] : dadd(Hrow, H[g * kWarpLanes]);
      }
      const double Z = G[ng];
      const Top2 row = rs.row;
      float c3[3];
      row_confidences(row, Z, Hrow, p.inv_t_w, p.entropy, c3);
      conf[3 * i + 0] = c3[0];
      conf[3 * i + 1] = c3[1];
      conf[3 * i + 2] = c3[2];
      rs.chunk = -1;
      rs.token = -1;
      if (p.greedy) {
        rs.token = static_cast<int64_t>(row.i1);
      } else {
        double u1, u2;
        row_uniforms(p.seed, p.offset, row_key, u1, u2);
        if (draws_mask(u1, ti, si)) {
          rs.token = p.mask_index;
        } else {
          const double target = dmul(u2, Z);
          double tau = 0.0;
          rs.chunk = pick_chunk(G, S, M, ng, nc, mrow, p.inv_t_w, target, tau);  // the CPU twin's call
          rs.tau = tau;
        }
      }
    }
    __syncthreads();
    // pass 2 (warp 0): the chosen chunk's 512 columns, their float64 prefix in column order (k, then lanes)
    if (warp == 0 && rs.chunk >= 0) {
      const int cs = static_cast<int>(rs.chunk);
      const float mc = M[cs];
      const double e = exp_weight(scaled_gap(mc, mrow, p.inv_t_w));
      float xs[kLaneCols], w[kLaneCols], sl, hl;
      lane_load(x, cs, lane, V, mask, keep, grid.full(cs), xs);
      lane_weights<false>(xs, mc, p.scale2, w, sl, hl);
      const double Tc = warp_butterfly(lane_total64(w));
      const double Sc = dmul(chunk_mass(warp_sum32(sl), Tc, cs == cm), e);
      const double thr = chunk_threshold(rs.tau, Sc, Tc);
#pragma unroll
      for (int k = 0; k < kLaneCols; ++k) rs.w2[k * kWarpLanes + lane] = w[k];
      __syncwarp();
      double C = 0.0;
      int64_t tok = -1, last = -1;
      for (int k = 0; k < kLaneCols; ++k) {  // warp-uniform control flow
        const float wk = rs.w2[k * kWarpLanes + lane];
        const double incl = warp_scan_incl(static_cast<double>(wk), lane);
        const bool live = wk > 0.0f;
        const unsigned int hit = __ballot_sync(kFull, live && dadd(C, incl) > thr);
        if (hit != 0u) {
          tok = lane_col(cs, __ffs(hit) - 1, k);
          break;
        }
        const unsigned int any = __ballot_sync(kFull, live);
        if (any != 0u) last = lane_col(cs, 31 - __clz(any), k);
        C = dadd(C, __shfl_sync(kFull, incl, kWarpLanes - 1));
      }
      if (lane == 0) rs.token = tok >= 0 ? tok : last;
    }
    __syncthreads();
    if (j == 0) tokens[i] = rs.token;
    __syncthreads();  // rs and the tables are rewritten for the next row
  }
}

// Dynamic shared memory of a row: the chunk tables, and with top-k / top-p the radix histogram (used before the
// tables are written, so they share the space).
size_t dyn_bytes(int64_t V, bool filter) {
  const int64_t nc = (V + kChunkCols - 1) / kChunkCols;
  const int64_t ng = (nc + kWarpLanes - 1) / kWarpLanes;
  const size_t tables = size_t(ng * kWarpLanes) * 2 * sizeof(double) + size_t(ng + 1) * sizeof(double) +
                        size_t(nc) * sizeof(float);
  const size_t hist = size_t(kRadixBins) * sizeof(uint64_t);
  return (filter && hist > tables) ? hist : tables;
}

template <typename T, bool kEntropy>
int launch_as(const T* logits, const float* t, const float* s, const int64_t* row_ids, int64_t* tokens, float* conf,
              int64_t N, const SampleParams& p, cudaStream_t stream) {
  const size_t smem = dyn_bytes(p.vocab, use_top_k(p) || use_top_p(p));
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(sample_step_kernel<T, kEntropy>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const unsigned int grid = static_cast<unsigned int>(N < int64_t(kMaxGrid) ? N : int64_t(kMaxGrid));
  sample_step_kernel<T, kEntropy><<<grid, kThreads, smem, stream>>>(logits, t, s, row_ids, tokens, conf, N, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch(const T* logits, const float* t, const float* s, const int64_t* row_ids, int64_t* tokens, float* conf,
           int64_t N, const SampleParams& p, cudaStream_t stream) {
  return p.entropy ? launch_as<T, true>(logits, t, s, row_ids, tokens, conf, N, p, stream)
                   : launch_as<T, false>(logits, t, s, row_ids, tokens, conf, N, p, stream);
}

}  // namespace

int sample_step_cuda(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params, void* stream) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch(static_cast<const float*>(logits), t, s, row_ids, tokens, conf, rows, with_scales(params), st);
    case kBFloat16:
      return launch(static_cast<const uint16_t*>(logits), t, s, row_ids, tokens, conf, rows, with_scales(params), st);
    default: return static_cast<int>(cudaErrorInvalidValue);  // validated by the binding already
  }
}

}  // namespace mdlm
