// CPU twin of csrc/cuda/sampling_cuda.cu: the same header functions (mdlm/sampling.h) with the same
// lane structure and combine tree, OpenMP over rows. Lane j = v mod 256 accumulates its columns in
// increasing order (iterating v = 0..V-1 and updating lane v & 255 gives each lane exactly that
// sequence); the top-p weights of a row are computed once into a per-thread buffer (the CUDA kernel
// recomputes them each pass: same values, same sums).
#include <cmath>
#include <stdexcept>
#include <vector>

#include "mdlm/ops.h"
#include "mdlm/sampling.h"

namespace mdlm {

namespace {

constexpr int kL = kSampleLanes;

// The gumbel_bound table, computed once (thread-safe static initialisation).
struct GumbelTable {
  float g[kGumbelBuckets];
  GumbelTable() {
    for (int b = 0; b < kGumbelBuckets; ++b) g[b] = gumbel_bound(static_cast<uint32_t>(b));
  }
};

const float* gumbel_table() {
  static const GumbelTable table;
  return table.g;
}

double lane_tree_sum(double* acc) {
  for (int stride = kL / 2; stride > 0; stride >>= 1) {
    for (int j = 0; j < stride; ++j) acc[j] = dadd(acc[j], acc[j + stride]);
  }
  return acc[0];
}

template <typename T>
uint32_t threshold_key(const T* x, int64_t V, uint32_t mask, const SampleParams& p, std::vector<double>& w) {
  KeyRange kr = key_range_init();
  for (int64_t v = 0; v < V; ++v) {
    if (v != mask) key_range_add(kr, load_logit(x, v));
  }
  if (kr.flags != 0u) return 0u;  // NaN / +inf row: invalid, no passes
  uint32_t lo = kr.lo, hi = kr.hi;
  if (use_top_k(p)) {
    const int64_t k = p.top_k;
    while (lo < hi) {
      const uint32_t mid = bisect_mid(lo, hi);
      int64_t count = 0;
      for (int64_t v = 0; v < V; ++v) {
        if (v != mask && float_key(load_logit(x, v)) > mid) ++count;
      }
      bisect_update(lo, hi, mid, count < k);
    }
  }
  const uint32_t keep_k = lo;
  if (!use_top_p(p)) return keep_k;
  const float x_max = key_float(kr.hi);
  w.resize(static_cast<size_t>(V));
  double acc[kL];
  for (int j = 0; j < kL; ++j) acc[j] = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const float xv = load_logit(x, v);
    const bool in = v != mask && float_key(xv) >= keep_k;
    w[v] = in ? top_p_weight(xv, x_max, p.inv_t) : 0.0;
    if (in) acc[v & (kL - 1)] = dadd(acc[v & (kL - 1)], w[v]);
  }
  const double target = dmul(p.top_p, lane_tree_sum(acc));
  lo = keep_k;
  hi = kr.hi;
  while (lo < hi) {
    const uint32_t mid = bisect_mid(lo, hi);
    for (int j = 0; j < kL; ++j) acc[j] = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      if (v != mask && float_key(load_logit(x, v)) > mid) acc[v & (kL - 1)] = dadd(acc[v & (kL - 1)], w[v]);
    }
    bisect_update(lo, hi, mid, lane_tree_sum(acc) < target);
  }
  return lo;
}

template <typename T>
void sample_rows(const T* logits, const float* t, const float* s, const int64_t* row_ids, int64_t* tokens,
                 float* conf, int64_t N, const SampleParams& p) {
  const int64_t V = p.vocab;
  const uint32_t mask = static_cast<uint32_t>(p.mask_index);
  const bool filter = use_top_k(p) || use_top_p(p);
  const float* g_hi = p.greedy ? nullptr : gumbel_table();
#if defined(_OPENMP)
#pragma omp parallel if (N > 1 && N * V > 16384)
#endif
  {
    std::vector<double> wbuf;
    SampleAcc lanes[kL];
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t i = 0; i < N; ++i) {
      const T* x = logits + i * V;
      uint32_t flags = 0u;
      const uint32_t row_key = row_key_of(row_ids, i, flags);
      const uint32_t keep = filter ? threshold_key(x, V, mask, p, wbuf) : 0u;
      const int active = V < kL ? static_cast<int>(V) : kL;
      for (int j = 0; j < active; ++j) lanes[j] = sample_acc_init();
      double cut = -inf64();  // shared by all lanes of the row (GUMBEL PREFILTER)
      for (int64_t v = 0; v < V; ++v) {
        if (v == mask) continue;
        sample_acc_add(lanes[v & (kL - 1)], load_logit(x, v), static_cast<uint32_t>(v), keep, p, row_key, g_hi, cut);
      }
      // the fixed tree; lanes >= active are empty and combine(a, empty) == a, so they are skipped
      for (int stride = kL / 2; stride > 0; stride >>= 1) {
        for (int j = 0; j < stride && j + stride < active; ++j) {
          lanes[j] = sample_acc_combine(lanes[j], lanes[j + stride], p.inv_t);
        }
      }
      const float ti = p.greedy ? 0.0f : t[i];
      const float si = p.greedy ? 0.0f : s[i];
      tokens[i] = sample_finalize(lanes[0], ti, si, row_key, flags, p, conf + 3 * i);
    }
  }
}

}  // namespace

void sample_step_cpu(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params) {
  if (rows == 0) return;
  const SampleParams p = resolve_offset(params);  // reads *params.offset_ptr (if any) once, as the kernel does
  switch (dtype) {
    case kFloat32:
      sample_rows(static_cast<const float*>(logits), t, s, row_ids, tokens, conf, rows, p);
      break;
    case kBFloat16:
      sample_rows(static_cast<const uint16_t*>(logits), t, s, row_ids, tokens, conf, rows, p);
      break;
    default: throw std::invalid_argument("sample_step_cpu: unsupported dtype");
  }
}

void sample_threshold_cpu(const void* logits, int dtype, int64_t rows, const SampleParams& params, uint32_t* keys) {
  const uint32_t mask = static_cast<uint32_t>(params.mask_index);
  std::vector<double> wbuf;
  for (int64_t i = 0; i < rows; ++i) {
    switch (dtype) {
      case kFloat32:
        keys[i] = threshold_key(static_cast<const float*>(logits) + i * params.vocab, params.vocab, mask, params, wbuf);
        break;
      case kBFloat16:
        keys[i] = threshold_key(static_cast<const uint16_t*>(logits) + i * params.vocab, params.vocab, mask, params,
                                wbuf);
        break;
      default: throw std::invalid_argument("sample_threshold_cpu: unsupported dtype");
    }
  }
}

// Test hook for the header transcendentals: fn 0 = log64, 1 = exp64, 2 = expf32 (input rounded to
// float32, result widened to double); Gumbel prefilter: the input is a 53-bit integer x (exact in
// float64) turned into the Philox words (w0, w1) that uniform53 maps to it, fn 3 = gumbel_of_words,
// fn 4 = the table bound the sampling pass uses for those words (g_hi[gumbel_bucket(w0)]).
void sample_math_cpu(int fn, const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w0 = 0u, w1 = 0u;
    if (fn == 3 || fn == 4) {
      if (!(in[i] >= 0.0 && in[i] < 9007199254740992.0) || in[i] != std::floor(in[i])) {
        throw std::invalid_argument("sample_math_cpu: fn 3 / 4 take integers x in [0, 2^53)");
      }
      const uint64_t x = static_cast<uint64_t>(in[i]);
      w0 = static_cast<uint32_t>(x >> 26) << 5;
      w1 = static_cast<uint32_t>(x & ((uint64_t(1) << 26) - 1u)) << 6;
    }
    switch (fn) {
      case 0: out[i] = log64(in[i]); break;
      case 1: out[i] = exp64(in[i]); break;
      case 2: out[i] = static_cast<double>(expf32(static_cast<float>(in[i]))); break;
      case 3: out[i] = gumbel_of_words(w0, w1); break;
      case 4: out[i] = static_cast<double>(gumbel_table()[gumbel_bucket(w0)]); break;
      default: throw std::invalid_argument("sample_math_cpu: unknown function code");
    }
  }
}

}  // namespace mdlm
