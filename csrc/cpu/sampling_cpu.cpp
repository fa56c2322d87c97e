// CPU twin of csrc/cuda/sampling_cuda.cu: the same header functions (mdlm/sampling.h) in the same order --
// chunks of 512 columns as 32 interleaved lanes x 16 columns, the float32 xor butterflies (max, sums) and the
// float64 Hillis-Steele lane scans emulated on arrays, chunk groups of 32 scanned the same way, the radix
// threshold descent with exact integer histograms -- so its tokens and confidences are bit-identical to the
// CUDA kernel's. OpenMP over rows.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mdlm/ops.h"
#include "mdlm/sampling.h"

namespace mdlm {

namespace {

// A row whose loads are counted (tests: how many logits a call reads; the CUDA kernel reads the same ones).
template <typename T>
struct CountedRow {
  const T* p;
  int64_t* loads;
};

using mdlm::load_logit;  // the header's overloads stay visible next to this one

template <typename T>
float load_logit(const CountedRow<T>& r, int64_t v) {
  ++*r.loads;
  return load_logit(r.p, v);
}

using mdlm::load_logit_raw;

template <typename T>
float load_logit_raw(const CountedRow<T>& r, int64_t v) {
  ++*r.loads;
  return load_logit_raw(r.p, v);
}

// Inclusive Hillis-Steele scan over 32 lanes, as the warp runs it (each step reads the previous step's values).
void lane_scan(double x[kWarpLanes]) {
  for (int o = 1; o < kWarpLanes; o <<= 1) {
    for (int l = kWarpLanes - 1; l >= o; --l) x[l] = dadd(x[l], x[l - o]);
  }
}

// The xor-butterfly total over 32 lanes (every lane ends with it; lane 0's is returned), as the warp runs it.
template <typename F, typename Op>
F lane_butterfly(const F in[kWarpLanes], Op op) {
  F x[kWarpLanes], y[kWarpLanes];
  std::memcpy(x, in, sizeof(x));
  for (int o = kWarpLanes / 2; o > 0; o >>= 1) {
    for (int l = 0; l < kWarpLanes; ++l) y[l] = op(x[l], x[l ^ o]);
    std::memcpy(x, y, sizeof(x));
  }
  return x[0];
}

double butterfly_sum64(const double in[kWarpLanes]) { return lane_butterfly(in, [](double a, double b) { return dadd(a, b); }); }
float butterfly_sum32(const float in[kWarpLanes]) { return lane_butterfly(in, [](float a, float b) { return fadd_nc(a, b); }); }
float butterfly_max32(const float in[kWarpLanes]) { return lane_butterfly(in, [](float a, float b) { return max_nan(a, b); }); }

// ---- thresholds -------------------------------------------------------------------------------------
// Radix descent (mdlm/sampling.h, TOP-K / TOP-P): the keep key of the row (0 keeps everything), flags bad logits.
template <typename Row>
uint32_t threshold_key(const Row& x, int64_t V, uint32_t mask, const SampleParams& p, uint32_t& flags) {
  std::vector<uint64_t> hist(kRadixBins);
  float x_max = -inf32();
  uint32_t keep = 0u;
  // top-k: counts
  bool scanned = false;
  if (use_top_k(p)) {
    const uint64_t k = static_cast<uint64_t>(p.top_k);
    uint32_t prefix = 0u;
    uint64_t above = 0u;
    for (int level = 0; level < kRadixLevels; ++level) {
      std::fill(hist.begin(), hist.end(), uint64_t(0));
      const uint32_t pm = radix_prefix_mask(level);
      for (int64_t v = 0; v < V; ++v) {
        if (v == int64_t(mask)) continue;
        const float xv = load_logit(x, v);
        if (level == 0) {
          if (bad_logit(xv)) {
            flags |= kFlagBadLogit;
            continue;
          }
          x_max = xv > x_max ? xv : x_max;
        } else if (bad_logit(xv)) {
          continue;
        }
        const uint32_t key = float_key(xv);
        if ((key & pm) != prefix) continue;
        ++hist[radix_digit(key, level)];
      }
      if (flags != 0u) return 0u;
      int b = radix_bins(level) - 1;
      for (; b > 0; --b) {
        if (above + hist[b] >= k) break;
        above += hist[b];
      }
      prefix |= static_cast<uint32_t>(b) << radix_shift(level);
    }
    keep = prefix;
    scanned = true;
  }
  if (!use_top_p(p)) return keep;
  if (!scanned) {  // the row maximum (and the flags) first
    for (int64_t v = 0; v < V; ++v) {
      if (v == int64_t(mask)) continue;
      const float xv = load_logit(x, v);
      if (bad_logit(xv)) {
        flags |= kFlagBadLogit;
        continue;
      }
      x_max = xv > x_max ? xv : x_max;
    }
    if (flags != 0u) return 0u;
  }
  if (x_max == -inf32()) return keep;  // nothing finite: the row is empty anyway
  // top-p: fixed-point masses over the top-k set
  uint64_t Z = 0u;
  uint32_t prefix = 0u;
  uint64_t above = 0u;
  double target = 0.0;
  for (int level = 0; level < kRadixLevels; ++level) {
    std::fill(hist.begin(), hist.end(), uint64_t(0));
    const uint32_t pm = radix_prefix_mask(level);
    for (int64_t v = 0; v < V; ++v) {
      if (v == int64_t(mask)) continue;
      const float xv = load_logit(x, v);
      if (bad_logit(xv)) continue;
      const uint32_t key = float_key(xv);
      if (key < keep || (key & pm) != prefix) continue;
      hist[radix_digit(key, level)] += mass_fixed(top_p_weight(xv, x_max, p.inv_t));
    }
    if (level == 0) {
      for (int b = 0; b < kRadixBins; ++b) Z += hist[b];
      target = dmul(p.top_p, static_cast<double>(Z));
    }
    int b = radix_bins(level) - 1;
    for (; b > 0; --b) {
      if (static_cast<double>(above + hist[b]) >= target) break;
      above += hist[b];
    }
    prefix |= static_cast<uint32_t>(b) << radix_shift(level);
  }
  return prefix > keep ? prefix : keep;
}

// ---- one row ------------------------------------------------------------------------------------------
struct RowScratch {
  std::vector<float> m;
  std::vector<double> s, h;  // per chunk: sums of w and w d relative to m_c; then scan values / scaled H
  std::vector<double> G;     // per group: exclusive prefix of the group totals
};

// One chunk's 32 lanes (loaded by lane_load), as the warp holds them.
struct ChunkLanes {
  float x[kWarpLanes][kLaneCols];
  float w[kWarpLanes][kLaneCols];
  float s[kWarpLanes], h[kWarpLanes], m[kWarpLanes];
};

template <typename Row>
void load_chunk(const Row& x, int c, int64_t V, uint32_t mask, uint32_t keep, ChunkLanes& ch) {
  const bool full = chunk_grid(V, mask, keep).full(c);
  for (int l = 0; l < kWarpLanes; ++l) lane_load(x, c, l, V, mask, keep, full, ch.x[l]);
}

// The chunk's weights relative to m and its float32 sums (the warp's butterflies); h = 0 unless entropy.
void chunk_weights(ChunkLanes& ch, float m, float scale2, bool entropy, float& s, float& h) {
  for (int l = 0; l < kWarpLanes; ++l) {
    if (entropy) {
      lane_weights<true>(ch.x[l], m, scale2, ch.w[l], ch.s[l], ch.h[l]);
    } else {
      lane_weights<false>(ch.x[l], m, scale2, ch.w[l], ch.s[l], ch.h[l]);
    }
  }
  s = butterfly_sum32(ch.s);
  h = entropy ? butterfly_sum32(ch.h) : 0.0f;
}

// Float64 inclusive scan over the lanes of the k-th weights (one step of pass 2's column-order prefix).
void column_scan(const ChunkLanes& ch, int k, double incl[kWarpLanes]) {
  for (int l = 0; l < kWarpLanes; ++l) incl[l] = static_cast<double>(ch.w[l][k]);
  lane_scan(incl);
}

template <typename Row>
int64_t sample_row(const Row& x, float t, float s, uint32_t row_key, uint32_t flags, const SampleParams& p,
                   float conf[3], RowScratch& sc, ChunkLanes& ch) {
  const int64_t V = p.vocab;
  const uint32_t mask = static_cast<uint32_t>(p.mask_index);
  const uint32_t keep = (use_top_k(p) || use_top_p(p)) ? threshold_key(x, V, mask, p, flags) : 0u;
  const int64_t nc = (V + kChunkCols - 1) / kChunkCols;
  const int64_t ng = (nc + kWarpLanes - 1) / kWarpLanes;
  sc.m.assign(static_cast<size_t>(nc), -inf32());
  sc.s.assign(static_cast<size_t>(ng * kWarpLanes), 0.0);
  sc.h.assign(static_cast<size_t>(ng * kWarpLanes), 0.0);
  sc.G.assign(static_cast<size_t>(ng + 1), 0.0);
  // pass 1: chunk statistics; the top two over the chunk maxima
  Top2 chunks = top2_init();
  for (int c = 0; c < static_cast<int>(nc); ++c) {
    load_chunk(x, c, V, mask, keep, ch);
    for (int l = 0; l < kWarpLanes; ++l) ch.m[l] = lane_max(ch.x[l]);
    const float m = fadd_nc(butterfly_max32(ch.m), 0.0f);  // -0 -> +0
    float sw, hw;
    chunk_weights(ch, m, p.scale2, p.entropy != 0, sw, hw);
    sc.m[c] = m;
    sc.s[c] = static_cast<double>(sw);
    sc.h[c] = chunk_h_nats(hw);
    if (bad_logit(m)) flags |= kFlagBadLogit;
    top2_add(chunks, m, static_cast<uint32_t>(c));
  }
  flags |= time_flags(t, s, p.greedy);
  if (chunks.x1 == -inf32()) flags |= kFlagEmpty;
  if (flags != 0u) {
    nan_confidences(conf);
    return -1;
  }
  // pass 1b: the first chunk holding the maximum: its top two and its float64 mass
  const float mrow = chunks.x1;
  const int cm = static_cast<int>(chunks.i1);
  load_chunk(x, cm, V, mask, keep, ch);
  Top2 in_chunk = top2_init();
  for (int l = 0; l < kWarpLanes; ++l) {
    Top2 tl = top2_init();
    lane_top2(ch.x[l], cm, l, tl);
    in_chunk = top2_combine(in_chunk, tl);
  }
  const Top2 row = row_top2(chunks, in_chunk);
  double incl[kWarpLanes];
  {
    float sw, hw;
    chunk_weights(ch, mrow, p.scale2, false, sw, hw);
    for (int l = 0; l < kWarpLanes; ++l) incl[l] = lane_total64(ch.w[l]);
    sc.s[cm] = butterfly_sum64(incl);
  }
  // chunks scaled to the row maximum; groups of 32 chunks scanned; group totals summed in order
  double Hrow = 0.0;
  for (int64_t g = 0; g < ng; ++g) {
    double S[kWarpLanes], H[kWarpLanes];
    for (int l = 0; l < kWarpLanes; ++l) {
      const int64_t c = g * kWarpLanes + l;
      double e = 0.0;
      S[l] = H[l] = 0.0;
      if (c < nc) chunk_scaled(sc.m[c], sc.s[c], sc.h[c], mrow, p.inv_t_w, e, S[l], H[l]);
    }
    const double hg = butterfly_sum64(H);
    lane_scan(S);
    for (int l = 0; l < kWarpLanes; ++l) sc.s[g * kWarpLanes + l] = S[l];  // now the group-local scan
    sc.G[g + 1] = dadd(sc.G[g], S[kWarpLanes - 1]);
    Hrow = g == 0 ? hg : dadd(Hrow, hg);
  }
  const double Z = sc.G[ng];
  row_confidences(row, Z, Hrow, p.inv_t_w, p.entropy, conf);
  if (p.greedy) return static_cast<int64_t>(row.i1);
  double u1, u2;
  row_uniforms(p.seed, p.offset, row_key, u1, u2);
  if (draws_mask(u1, t, s)) return p.mask_index;
  const double target = dmul(u2, Z);
  // the chunk (pick_chunk: the first live c with P_c > target, else the last live chunk with tau = +inf)
  double tau = 0.0;
  const int cs =
      static_cast<int>(pick_chunk(sc.G.data(), sc.s.data(), sc.m.data(), ng, nc, mrow, p.inv_t_w, target, tau));
  if (cs < 0) return -1;  // no live chunk: not reached for a valid row (the maximum's chunk is live)
  // pass 2: the chosen chunk's columns, their float64 prefix in column order (k-major, lanes within k)
  const float mc = sc.m[cs];
  const double e = exp_weight(scaled_gap(mc, mrow, p.inv_t_w));
  load_chunk(x, cs, V, mask, keep, ch);
  float sw, hw;
  chunk_weights(ch, mc, p.scale2, false, sw, hw);
  for (int l = 0; l < kWarpLanes; ++l) incl[l] = lane_total64(ch.w[l]);
  const double T = butterfly_sum64(incl);
  const double Sc = dmul(chunk_mass(sw, T, cs == cm), e);
  const double thr = chunk_threshold(tau, Sc, T);
  double C = 0.0;
  int64_t last = -1;
  for (int k = 0; k < kLaneCols; ++k) {
    column_scan(ch, k, incl);
    for (int l = 0; l < kWarpLanes; ++l) {
      if (!(ch.w[l][k] > 0.0f)) continue;
      if (dadd(C, incl[l]) > thr) return lane_col(cs, l, k);
      last = lane_col(cs, l, k);
    }
    C = dadd(C, incl[kWarpLanes - 1]);
  }
  return last;
}

template <typename T>
void sample_rows(const T* logits, const float* t, const float* s, const int64_t* row_ids, int64_t* tokens,
                 float* conf, int64_t N, const SampleParams& p, int64_t* loads) {
  const int64_t V = p.vocab;
#if defined(_OPENMP)
#pragma omp parallel if (N > 1 && N * V > 16384)
#endif
  {
    RowScratch sc;
    ChunkLanes ch;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t i = 0; i < N; ++i) {
      uint32_t flags = 0u;
      const uint32_t row_key = row_key_of(row_ids, i, flags);
      const float ti = p.greedy ? 0.0f : t[i];
      const float si = p.greedy ? 0.0f : s[i];
      if (loads != nullptr) {
        loads[i] = 0;
        tokens[i] =
            sample_row(CountedRow<T>{logits + i * V, loads + i}, ti, si, row_key, flags, p, conf + 3 * i, sc, ch);
      } else {
        tokens[i] = sample_row(logits + i * V, ti, si, row_key, flags, p, conf + 3 * i, sc, ch);
      }
    }
  }
}

}  // namespace

void sample_step_cpu(const void* logits, int dtype, const float* t, const float* s, const int64_t* row_ids,
                     int64_t* tokens, float* conf, int64_t rows, const SampleParams& params, int64_t* loads) {
  if (rows == 0) return;
  const SampleParams p = with_scales(resolve_offset(params));  // offset_ptr read once, as the kernel does
  switch (dtype) {
    case kFloat32:
      sample_rows(static_cast<const float*>(logits), t, s, row_ids, tokens, conf, rows, p, loads);
      break;
    case kBFloat16:
      sample_rows(static_cast<const uint16_t*>(logits), t, s, row_ids, tokens, conf, rows, p, loads);
      break;
    default: throw std::invalid_argument("sample_step_cpu: unsupported dtype");
  }
}

void sample_threshold_cpu(const void* logits, int dtype, int64_t rows, const SampleParams& params, uint32_t* keys) {
  const uint32_t mask = static_cast<uint32_t>(params.mask_index);
  for (int64_t i = 0; i < rows; ++i) {
    uint32_t flags = 0u;
    switch (dtype) {
      case kFloat32:
        keys[i] = threshold_key(static_cast<const float*>(logits) + i * params.vocab, params.vocab, mask, params, flags);
        break;
      case kBFloat16:
        keys[i] = threshold_key(static_cast<const uint16_t*>(logits) + i * params.vocab, params.vocab, mask, params,
                                flags);
        break;
      default: throw std::invalid_argument("sample_threshold_cpu: unsupported dtype");
    }
  }
}

// Test hook for the chunk choice (pick_chunk): G (ng + 1), S (ng * 32), M (nc) as the row pass leaves them.
int64_t sample_pick_chunk_cpu(const double* G, const double* S, const float* M, int64_t ng, int64_t nc, float m,
                              double inv_t, double target, double* tau) {
  return pick_chunk(G, S, M, ng, nc, m, inv_t, target, *tau);
}

// Test hook for the header transcendentals: fn 0 = log64, 1 = exp64, 2 = expf32 (input rounded to float32,
// result widened to double), 3 = exp_weight, 4 = weight32 (2^d for d rounded to float32: weight32(d, 0, 1)).
void sample_math_cpu(int fn, const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    switch (fn) {
      case 0: out[i] = log64(in[i]); break;
      case 1: out[i] = exp64(in[i]); break;
      case 2: out[i] = static_cast<double>(expf32(static_cast<float>(in[i]))); break;
      case 3: out[i] = exp_weight(in[i]); break;
      case 4: {  // 2^d
        float d = 0.0f;
        out[i] = static_cast<double>(weight32(static_cast<float>(in[i]), 0.0f, 1.0f, d));
        break;
      }
      default: throw std::invalid_argument("sample_math_cpu: unknown function code");
    }
  }
}

}  // namespace mdlm
