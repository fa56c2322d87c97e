// Fused categorical sampling step of MDLM (ancestral step t -> s, loglinear schedule), written once
// as host/device code: the CPU twin (csrc/cpu/sampling_cpu.cpp) and the CUDA kernel
// (csrc/cuda/sampling_cuda.cu) call the SAME functions below, with the SAME reduction order, so
// they return bit-identical tokens and confidences. The float64 PyTorch reference
// (mdlm_kernels/ops/sampling.py) is the spec.
//
// THE DISTRIBUTION (row i of the (N, V) logits, the rows of masked positions):
//   a_v   = x_v * inv_t                 (float64; inv_t = 1 / temperature rounded once to float64)
//   p     = softmax of a over the KEPT classes K = { v != MASK : key(x_v) >= kappa, x_v > -inf }
//   draw  from the unnormalised categorical { v in K: p_v (t - s) } U { MASK: s }
//   greedy: the argmax of x over K (ties -> lowest index); t, s and the RNG are not used.
//
// EXACT GUMBEL-MAX (no truncation, nothing written to memory but the outputs):
//   u_v = uniform53 of Philox element (row = row_ids[i] (default i), col = v) at (seed, offset)
//         (philox.h keying; words w.x, w.y). The MASK competitor uses col = mask_index.
//         offset is the effective one: host offset + the device-side int64 at params.offset_ptr
//         (mod 2^64; philox.h, DEVICE-SIDE OFFSET), read by the kernel when it runs.
//   G_v = -log64(-log64(u_v)) in float64 (u in [2^-54, 1 - 2^-53]: G in [-3.6, 36.7]; 32-bit
//         uniforms would cap G at 16.6).
//   best = max_{v in K} (a_v + G_v), ties -> lowest index.
//   lse  = a_max + log64(S), S = sum_{v in K} expf32(d_v), d_v = float32((x_v - m) * inv_t) with m the
//          running maximum of x (online log-sum-exp, FLOAT32 accumulation of S; a_max in float64).
//   non-MASK wins  <=>  s > 0 ? (best - lse) + log64(t - s) > log64(s) + G_MASK : true   (float64)
//   The float32 accumulation of S is the only approximation: |error of lse| ~ 1e-7 (relative to
//   S), which moves P(MASK) by a relative ~1e-7; Gumbel noise and the race are float64.
//
// GUMBEL PREFILTER (speed only: tokens and confidences are exactly those of the race above).
//   G(x) = gumbel_of_words as a function of the 53-bit integer x behind u is non-decreasing up to
//   log64's rounding; bucket(x) = x >> 41 (4096 buckets). Table g_hi[b] = float32 round-up of
//   G~(x_max(b)) + 1e-12 max(1, |G~(x_max(b))|), G~ the computed value at the bucket's largest x
//   (same log64 path); g_hi[4095] = +inf. Bound: with e the relative error of log64 (measured
//   <= 1 ulp = 2^-52; buckets < 4095 have u in [2^-54, 1 - 2^-12]), G~ = -log64(-log64(u)) has
//   |G~(x) - G(x)| <= eta(x) ~ e (1 + |G(x)|), and for x in bucket b (G exact, increasing):
//   G~(x) <= G(x) + eta(x) <= G(x_max) + eta(x) <= G~(x_max) + eta(x) + eta(x_max) < g_hi[b], since
//   eta(x) + eta(x_max) <= e (2 + |G(x)| + |G(x_max)|) <= 1e-12 max(1, |G~(x_max)|) whenever
//   e <= ~400 ulp (|G| <= 3.6 where G < 0; |G(x)| <= G(x_max) where G >= 0); at 2 ulp it is
//   < 2e-14 against a margin >= 1e-12. Element v is SKIPPED (no logs) iff
//   dadd(a_v, g_hi[b]) < cut, cut = an exact score a_w + G~_w already computed for a kept w of the
//   same row: then score_v = dadd(a_v, G~_v) <= dadd(a_v, g_hi[b]) < cut <= best (IEEE rounding is
//   monotone), so v is not the row's argmax and has no tie with it. Lanes still update their own
//   (best, ib) with the exact score; a lane may keep a smaller best (or none) than without the
//   prefilter, but the combined (best, ib) is the lexicographic maximum (score desc, index asc) over
//   the non-skipped elements, which contain every element scoring the row maximum, so it is the
//   same as without the prefilter bit for bit. cut: the CPU twin shares one cut across all lanes of
//   the row; the CUDA kernel shares it across the 32 lanes of a warp (refreshed by a warp max when
//   a lane raised it), so a warp rarely diverges into the exact path.
//
// TOP-K / TOP-P (thresholds on the logits, no sort): key(x) maps float32 to uint32 monotonically
// (-0 -> +0). Counts/masses run over v != MASK (x = -inf included in counts, mass 0).
//   top-k (0 < k < V - 1): kappa_k = smallest key c with #{v : key(x_v) > c} < k, found by bisection
//          over [key_min, key_max] (<= 32 passes of exact integer counts): keeps every class whose
//          logit is >= the k-th largest logit (TIES AT THE THRESHOLD ARE KEPT: possibly more than k).
//   top-p (0 < p < 1), applied after top-k on p renormalised over the top-k set:
//          w_v = exp64((x_v - x_max) * inv_t), Z = sum over the top-k set (float64, fixed order);
//          kappa_p = smallest key c >= kappa_k with sum_{key(x_v) > c} w_v < p * Z (bisection,
//          <= 32 passes): v is kept iff the probability mass STRICTLY above it is < p (the top
//          class is always kept; ties at the threshold are kept).
//   top_k = 0 (or >= V - 1) and top_p = 1 skip these passes.
//
// CONFIDENCE (float32, of p over K): [max probability 1/S, margin (1 - exp(d_2)) / S with d_2 the
//   scaled gap to the second largest kept logit (0 when one class is kept), entropy in nats
//   log S - H/S with H = sum exp(d_v) d_v (float32 accumulation, final combination in float64)].
//
// INVALID ROWS -> token -1 and confidence NaN (flags, never a host sync): a NaN or +inf logit at a
//   non-MASK column; no kept class with a logit > -inf; row id outside [0, 2^32); and unless greedy:
//   not (0 <= s < t <= 1) (NaN included). The MASK column's logit is never read.
//
// REDUCTION ORDER (the bit-identity contract): kSampleLanes = 256 lanes; lane j accumulates
//   v = j, j + 256, j + 512, ... in increasing order; lanes are combined by the fixed pairwise tree
//   for stride = 128, 64, ..., 1: lane[j] = combine(lane[j], lane[j + stride]) for j < stride. The
//   CUDA kernel runs one 256-thread block per row (thread j = lane j, shared memory tree); the CPU
//   twin runs the same lanes sequentially. combine(A, empty) == A bitwise, so the CPU skips empty
//   lanes. Threshold counts are integers (order-free); float64 masses use the same lane tree.
//
// ARITHMETIC: every float op on the decision path goes through non-contracting helpers (dmul/dadd/
//   dsub/ddiv of masking.h for float64, fmul_nc/fadd_nc/fsub_nc below for float32: __*_rn on the
//   device, plain operators under -ffp-contract=off on the host), and the transcendentals are implemented here with
//   those helpers (log64, exp64, expf32), so libdevice vs glibc differences cannot enter.
//   Accuracy (tests/test_sampling_kernel.py measures it against the C library): log64 <= 1 ulp,
//   exp64 <= 1 ulp, expf32 <= 1 ulp (float32) on the tested ranges. exp64 returns 0 for
//   x < -708.3 and expf32 returns 0 for x < -87.3 (results below the smallest normal are flushed).
#pragma once

#include "mdlm/common.h"
#include "mdlm/masking.h"  // dmul / dadd / dsub / ddiv (non-contracting float64 arithmetic)
#include "mdlm/philox.h"

namespace mdlm {

constexpr int kSampleLanes = 256;
constexpr uint32_t kNoIndex = 0xFFFFFFFFu;  // "no index yet" (V < 2^31, so never a column)

// row flags
constexpr uint32_t kFlagBadLogit = 1u;  // NaN or +inf logit at a non-MASK column
constexpr uint32_t kFlagBadTime = 2u;   // not (0 <= s < t <= 1)
constexpr uint32_t kFlagBadRowId = 4u;  // row id outside [0, 2^32)
constexpr uint32_t kFlagEmpty = 8u;     // no kept class with a logit > -inf

struct SampleParams {
  int64_t vocab;       // V >= 2
  int64_t mask_index;  // in [0, V)
  double inv_t;        // 1 / temperature
  int64_t top_k;       // 0: off
  double top_p;        // 1: off
  int greedy;          // 0 / 1
  uint64_t seed, offset;
  // Device-side offset (philox.h, DEVICE-SIDE OFFSET): one int64 in the memory of the logits, or
  // nullptr. The CPU twin and the CUDA kernel resolve it once per call / per thread with
  // resolve_offset below, before any draw; the header functions then read p.offset only.
  const int64_t* offset_ptr = nullptr;
};

// p with offset := effective_offset(p.offset, p.offset_ptr) and offset_ptr := nullptr (idempotent).
MDLM_HD SampleParams resolve_offset(SampleParams p) {
  p.offset = effective_offset(p.offset, p.offset_ptr);
  p.offset_ptr = nullptr;
  return p;
}

// ---- bit casts and non-contracting float32 arithmetic -----------------------------------------
MDLM_HD uint64_t double_as_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
#endif
}

MDLM_HD double bits_as_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, sizeof(d));
  return d;
#endif
}

#if defined(__CUDA_ARCH__)
MDLM_HD float fmul_nc(float a, float b) { return __fmul_rn(a, b); }
MDLM_HD float fadd_nc(float a, float b) { return __fadd_rn(a, b); }
MDLM_HD float fsub_nc(float a, float b) { return __fsub_rn(a, b); }
#else
// Host: compiled with -ffp-contract=off (setup.py): plain operators are single rounded operations.
MDLM_HD float fmul_nc(float a, float b) { return a * b; }
MDLM_HD float fadd_nc(float a, float b) { return a + b; }
MDLM_HD float fsub_nc(float a, float b) { return a - b; }
#endif

MDLM_HD double inf64() { return bits_as_double(0x7FF0000000000000ull); }
MDLM_HD float inf32() { return bits_as_float(0x7F800000u); }

MDLM_HD bool is_nan32(float x) { return (float_as_bits(x) & 0x7FFFFFFFu) > 0x7F800000u; }

// ---- transcendentals (see ARITHMETIC above) -----------------------------------------------------
// ln 2 split: kLn2Hi has 21 significant bits (k * kLn2Hi exact for |k| < 2^11), kLn2Lo the rest.
constexpr double kLn2Hi = 0.6931467056274414;        // 0x3FE62E4200000000
constexpr double kLn2Lo = 4.7493250390316726e-07;
constexpr double kInvLn2 = 1.4426950408889634;
constexpr float kLn2HiF = 0.693115234375f;            // 0x3F317000: 12 significant bits
constexpr float kLn2LoF = 3.194618329871446e-05f;
constexpr float kInvLn2F = 1.44269504f;

// Natural log in float64. Range reduction x = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)) (f exact),
// then log(1 + f) = 2 atanh(r), r = f / (2 + f) = f - hf + r (hf + R), hf = f^2 / 2,
// R = sum_{k=1..11} 2 r^(2k) / (2k + 1) (|r| <= 0.1716: the truncation is < 2^-60 relative).
MDLM_HD double log64(double x) {
  if (!(x > 0.0)) return x == 0.0 ? -inf64() : (x - x) / (x - x);  // -inf, or NaN for x < 0 / NaN
  if (x == inf64()) return x;
  uint64_t b = double_as_bits(x);
  int e = 0;
  if ((b >> 52) == 0) {  // subnormal: scale by 2^54 (exact)
    x = dmul(x, 18014398509481984.0);
    b = double_as_bits(x);
    e = -54;
  }
  e += static_cast<int>(b >> 52) - 1023;
  double m = bits_as_double((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  if (m > 1.4142135623730951) {
    m = dmul(m, 0.5);  // exact
    e += 1;
  }
  const double f = dsub(m, 1.0);  // exact (Sterbenz)
  const double r = ddiv(f, dadd(2.0, f));
  const double z = dmul(r, r);
  double R = 2.0 / 23.0;
  R = dadd(2.0 / 21.0, dmul(z, R));
  R = dadd(2.0 / 19.0, dmul(z, R));
  R = dadd(2.0 / 17.0, dmul(z, R));
  R = dadd(2.0 / 15.0, dmul(z, R));
  R = dadd(2.0 / 13.0, dmul(z, R));
  R = dadd(2.0 / 11.0, dmul(z, R));
  R = dadd(2.0 / 9.0, dmul(z, R));
  R = dadd(2.0 / 7.0, dmul(z, R));
  R = dadd(2.0 / 5.0, dmul(z, R));
  R = dadd(2.0 / 3.0, dmul(z, R));
  R = dmul(z, R);
  const double hf = dmul(dmul(0.5, f), f);
  const double ed = static_cast<double>(e);
  // log x = e ln2_hi + (f - (hf - (r (hf + R) + e ln2_lo)))
  const double corr = dsub(hf, dadd(dmul(r, dadd(hf, R)), dmul(ed, kLn2Lo)));
  return dadd(dmul(ed, kLn2Hi), dsub(f, corr));
}

// exp in float64: x = k ln2 + r (Cody-Waite, |r| <= ln2/2), degree-13 Taylor polynomial (truncation
// < 2^-60 relative), scaled by 2^k through the exponent bits. Results below 2^-1022 flush to 0.
MDLM_HD double exp64(double x) {
  if (x != x) return x;
  if (x < -708.3) return 0.0;
  if (x > 709.78) return inf64();
  double kd = dadd(dmul(x, kInvLn2), 0.5);
#if defined(__CUDA_ARCH__)
  kd = ::floor(kd);
#else
  kd = std::floor(kd);
#endif
  const double r = dsub(dsub(x, dmul(kd, kLn2Hi)), dmul(kd, kLn2Lo));
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = dadd(1.0 / 479001600.0, dmul(r, p));
  p = dadd(1.0 / 39916800.0, dmul(r, p));
  p = dadd(1.0 / 3628800.0, dmul(r, p));
  p = dadd(1.0 / 362880.0, dmul(r, p));
  p = dadd(1.0 / 40320.0, dmul(r, p));
  p = dadd(1.0 / 5040.0, dmul(r, p));
  p = dadd(1.0 / 720.0, dmul(r, p));
  p = dadd(1.0 / 120.0, dmul(r, p));
  p = dadd(1.0 / 24.0, dmul(r, p));
  p = dadd(1.0 / 6.0, dmul(r, p));
  p = dadd(0.5, dmul(r, p));
  p = dadd(1.0, dmul(r, p));
  p = dadd(1.0, dmul(r, p));
  int k = static_cast<int>(kd);  // in [-1022, 1024]
  if (k > 1023) {                 // x in (709.08, 709.78]: 2^1024 is not a double
    p = dmul(p, 2.0);
    k -= 1;
  }
  if (k < -1022) return 0.0;
  return dmul(p, bits_as_double(static_cast<uint64_t>(k + 1023) << 52));
}

// exp in float32 for the online log-sum-exp: same scheme, degree-7 Taylor (truncation < 2^-27
// relative). Results below 2^-126 flush to 0; callers only pass x <= 0.
MDLM_HD float expf32(float x) {
  if (is_nan32(x)) return x;
  if (x < -87.3f) return 0.0f;
  if (x > 88.7f) return inf32();
  float kf = fadd_nc(fmul_nc(x, kInvLn2F), 0.5f);
#if defined(__CUDA_ARCH__)
  kf = ::floorf(kf);
#else
  kf = std::floor(kf);
#endif
  const float r = fsub_nc(fsub_nc(x, fmul_nc(kf, kLn2HiF)), fmul_nc(kf, kLn2LoF));
  float p = 1.0f / 5040.0f;
  p = fadd_nc(1.0f / 720.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 120.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 24.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 6.0f, fmul_nc(r, p));
  p = fadd_nc(0.5f, fmul_nc(r, p));
  p = fadd_nc(1.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f, fmul_nc(r, p));
  int k = static_cast<int>(kf);
  if (k > 127) {
    p = fmul_nc(p, 2.0f);
    k -= 1;
  }
  if (k < -126) return 0.0f;
  return fmul_nc(p, bits_as_float(static_cast<uint32_t>(k + 127) << 23));
}

// ---- logits -------------------------------------------------------------------------------------
// Load a logit as float32 (bf16 widened exactly), -0 canonicalised to +0.
template <typename T>
MDLM_HD float load_logit(const T* p, int64_t v);

template <>
MDLM_HD float load_logit<float>(const float* p, int64_t v) {
  const float x = p[v];
  return x == 0.0f ? 0.0f : x;
}

template <>
MDLM_HD float load_logit<uint16_t>(const uint16_t* p, int64_t v) {
  const float x = bf16_bits_to_float(p[v]);
  return x == 0.0f ? 0.0f : x;
}

// Monotone float32 -> uint32 key (x not NaN; -0 already +0). key(-inf) = 0x007FFFFF.
MDLM_HD uint32_t float_key(float x) {
  const uint32_t b = float_as_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inverse of float_key.
MDLM_HD float key_float(uint32_t c) { return bits_as_float((c & 0x80000000u) ? (c & 0x7FFFFFFFu) : ~c); }

// Which threshold passes a call needs (top-k / top-p active).
MDLM_HD bool use_top_k(const SampleParams& p) { return p.top_k > 0 && p.top_k < p.vocab - 1; }
MDLM_HD bool use_top_p(const SampleParams& p) { return p.top_p < 1.0; }

MDLM_HD bool bad_logit(float x) { return is_nan32(x) || x == inf32(); }

// Gumbel noise of the Philox words (w0, w1): -log(-log(u)), u = uniform53 (float64).
MDLM_HD double gumbel_of_words(uint32_t w0, uint32_t w1) { return -log64(-log64(uniform53(w0, w1))); }

// Gumbel noise of Philox element (row, col).
MDLM_HD double gumbel64(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col) {
  const U32x4 w = philox_for_element(seed, offset, row, col);
  return gumbel_of_words(w.x, w.y);
}

// ---- Gumbel upper-bound table (the race's prefilter; see GUMBEL PREFILTER above) -----------------
constexpr int kGumbelBucketBits = 12;
constexpr int kGumbelBuckets = 1 << kGumbelBucketBits;  // 4096

// Bucket of the 53-bit integer x behind uniform53(w0, w1): x >> 41 == w0 >> 20 (x = (w0 >> 5) 2^26 +
// (w1 >> 6) and w1 >> 6 < 2^26, so the top 12 bits of x are the top 12 bits of w0).
MDLM_HD uint32_t gumbel_bucket(uint32_t w0) { return w0 >> (32 - kGumbelBucketBits); }

// Smallest float32 > f (f finite, not NaN); 0 -> 2^-126 (any positive float is above 0).
MDLM_HD float float_next_up(float f) {
  if (f == 0.0f) return bits_as_float(0x00800000u);
  const uint32_t b = float_as_bits(f);
  return bits_as_float(f > 0.0f ? b + 1u : b - 1u);
}

// Upper bound of gumbel_of_words over bucket b, as float32 (rounded up). The last bucket (u -> 1) is
// +inf. Otherwise: the computed G at the bucket's LARGEST x, plus 1e-12 max(1, |G|), rounded up.
MDLM_HD float gumbel_bound(uint32_t b) {
  if (b + 1u >= static_cast<uint32_t>(kGumbelBuckets)) return inf32();
  // largest x of the bucket: (w0 >> 5) = b 2^15 + (2^15 - 1), (w1 >> 6) = 2^26 - 1
  const double g = gumbel_of_words((b << (32 - kGumbelBucketBits)) | (0xFFFFFFFFu >> kGumbelBucketBits), 0xFFFFFFFFu);
  const double ag = g < 0.0 ? -g : g;
  const double hi = dadd(g, dmul(1e-12, ag > 1.0 ? ag : 1.0));
  float f = static_cast<float>(hi);  // round to nearest, then up if it went down
  if (static_cast<double>(f) < hi) f = float_next_up(f);
  return f;
}

// ---- threshold passes ----------------------------------------------------------------------------
// Per-lane state of the key-range pass (order-free: min / max / or).
struct KeyRange {
  uint32_t lo, hi, flags;
};

MDLM_HD KeyRange key_range_init() { return KeyRange{0xFFFFFFFFu, 0u, 0u}; }

MDLM_HD void key_range_add(KeyRange& k, float x) {
  if (bad_logit(x)) {
    k.flags |= kFlagBadLogit;
    return;
  }
  const uint32_t c = float_key(x);
  k.lo = c < k.lo ? c : k.lo;
  k.hi = c > k.hi ? c : k.hi;
}

MDLM_HD KeyRange key_range_combine(KeyRange a, const KeyRange& b) {
  a.lo = b.lo < a.lo ? b.lo : a.lo;
  a.hi = b.hi > a.hi ? b.hi : a.hi;
  a.flags |= b.flags;
  return a;
}

// One bisection step over [lo, hi] (lo < hi) for the smallest c with pred(c) true (pred(hi) is true
// and pred is monotone): returns the midpoint to test; `bisect_update` narrows the interval.
MDLM_HD uint32_t bisect_mid(uint32_t lo, uint32_t hi) { return lo + ((hi - lo) >> 1); }
MDLM_HD void bisect_update(uint32_t& lo, uint32_t& hi, uint32_t mid, bool pred_mid) {
  if (pred_mid) {
    hi = mid;
  } else {
    lo = mid + 1u;
  }
}

// top-p weight of a (valid) logit: exp64((x - x_max) inv_t); 0 for -inf.
MDLM_HD double top_p_weight(float x, float x_max, double inv_t) {
  if (x == -inf32()) return 0.0;
  return exp64(dmul(dsub(static_cast<double>(x), static_cast<double>(x_max)), inv_t));
}

// ---- the sampling pass ---------------------------------------------------------------------------
struct SampleAcc {
  float m;      // running max of the kept logits (raw x), -inf when empty
  float S;      // sum exp(d), d = float32((x - m) inv_t); 0 iff empty
  float H;      // sum exp(d) d
  float x1, x2;  // largest and second largest kept logit (with multiplicity)
  uint32_t i1;  // index of x1 (lowest on ties)
  uint32_t ib;  // index of the best Gumbel score (lowest on ties)
  double best;  // best Gumbel score a_v + G_v
  uint32_t flags;
};

MDLM_HD SampleAcc sample_acc_init() {
  return SampleAcc{-inf32(), 0.0f, 0.0f, -inf32(), -inf32(), kNoIndex, kNoIndex, -inf64(), 0u};
}

MDLM_HD float scaled_diff(float x, float m, double inv_t) {
  return static_cast<float>(dmul(dsub(static_cast<double>(x), static_cast<double>(m)), inv_t));
}

// Element v (v != MASK) with logit x (load_logit); keep_key: kappa (0 keeps everything).
// g_hi: the gumbel_bound table (kGumbelBuckets entries; unused when greedy). cut: a lower bound of the
// row's best score (-inf at the start of a row; the exact score of some kept element of the row
// otherwise); raised here to every exact score computed, and callers may raise it to any score
// another lane of the same row computed (GUMBEL PREFILTER).
MDLM_HD void sample_acc_add(SampleAcc& a, float x, uint32_t v, uint32_t keep_key, const SampleParams& p,
                            uint32_t row_key, const float* g_hi, double& cut) {
  if (bad_logit(x)) {
    a.flags |= kFlagBadLogit;
    return;
  }
  if (x == -inf32() || float_key(x) < keep_key) return;  // probability 0 / filtered out
  // online log-sum-exp and entropy accumulator (float32)
  if (a.S == 0.0f) {
    a.m = x;
    a.S = 1.0f;
    a.H = 0.0f;
  } else if (x > a.m) {
    const float d = scaled_diff(a.m, x, p.inv_t);  // <= 0
    const float c = expf32(d);
    a.H = fmul_nc(c, fadd_nc(a.H, fmul_nc(a.S, d)));
    a.S = fadd_nc(fmul_nc(a.S, c), 1.0f);
    a.m = x;
  } else {
    const float d = scaled_diff(x, a.m, p.inv_t);
    const float w = expf32(d);
    a.S = fadd_nc(a.S, w);
    a.H = fadd_nc(a.H, fmul_nc(w, d));
  }
  // top-2 and the greedy argmax (v increases within a lane: strict > keeps the lowest index)
  if (x > a.x1) {
    a.x2 = a.x1;
    a.x1 = x;
    a.i1 = v;
  } else if (x > a.x2) {
    a.x2 = x;
  }
  if (!p.greedy) {
    const double av = dmul(static_cast<double>(x), p.inv_t);
    const U32x4 w = philox_for_element(p.seed, p.offset, row_key, v);
    // prefilter: score = av + G <= av + g_hi[bucket] (rounding is monotone) < cut <= the row's best
    if (dadd(av, static_cast<double>(g_hi[gumbel_bucket(w.x)])) < cut) return;
    const double score = dadd(av, gumbel_of_words(w.x, w.y));
    if (score > a.best) {
      a.best = score;
      a.ib = v;
    }
    if (score > cut) cut = score;
  }
}

MDLM_HD bool better(double s1, uint32_t i1, double s2, uint32_t i2) { return s1 > s2 || (s1 == s2 && i1 < i2); }

// a = lower lane, b = upper lane. combine(a, empty) == a and combine(empty, b) == b bitwise.
MDLM_HD SampleAcc sample_acc_combine(SampleAcc a, const SampleAcc& b, double inv_t) {
  if (b.S != 0.0f) {
    if (a.S == 0.0f) {
      a.m = b.m;
      a.S = b.S;
      a.H = b.H;
    } else if (b.m > a.m) {
      const float d = scaled_diff(a.m, b.m, inv_t);
      const float c = expf32(d);
      a.H = fadd_nc(b.H, fmul_nc(c, fadd_nc(a.H, fmul_nc(a.S, d))));
      a.S = fadd_nc(b.S, fmul_nc(a.S, c));
      a.m = b.m;
    } else {
      const float d = scaled_diff(b.m, a.m, inv_t);
      const float c = expf32(d);
      a.H = fadd_nc(a.H, fmul_nc(c, fadd_nc(b.H, fmul_nc(b.S, d))));
      a.S = fadd_nc(a.S, fmul_nc(b.S, c));
    }
  }
  const float lo1 = a.x1 < b.x1 ? a.x1 : b.x1;
  const float hi2 = a.x2 > b.x2 ? a.x2 : b.x2;
  if (better(b.x1, b.i1, a.x1, a.i1)) {
    a.x1 = b.x1;
    a.i1 = b.i1;
  }
  a.x2 = lo1 > hi2 ? lo1 : hi2;
  if (better(b.best, b.ib, a.best, a.ib)) {
    a.best = b.best;
    a.ib = b.ib;
  }
  a.flags |= b.flags;
  return a;
}

// Row result from the combined state. t, s: the row's times (ignored when greedy); flags: row flags
// gathered outside the accumulator (times, row id). conf: [max prob, margin, entropy].
MDLM_HD int64_t sample_finalize(const SampleAcc& a, float t, float s, uint32_t row_key, uint32_t flags,
                                const SampleParams& p, float conf[3]) {
  flags |= a.flags;
  if (a.S == 0.0f) flags |= kFlagEmpty;
  if (!p.greedy && !(s >= 0.0f && s < t && t <= 1.0f)) flags |= kFlagBadTime;
  if (flags != 0u) {
    const float nan = bits_as_float(0x7FC00000u);
    conf[0] = conf[1] = conf[2] = nan;
    return -1;
  }
  const double S = static_cast<double>(a.S);
  const double logS = log64(S);
  const double p1 = ddiv(1.0, S);
  const double w2 = a.x2 == -inf32() ? 0.0 : exp64(static_cast<double>(scaled_diff(a.x2, a.x1, p.inv_t)));
  conf[0] = static_cast<float>(p1);
  conf[1] = static_cast<float>(ddiv(dsub(1.0, w2), S));
  const double ent = dsub(logS, ddiv(static_cast<double>(a.H), S));
  conf[2] = static_cast<float>(ent > 0.0 ? ent : 0.0);
  if (p.greedy) return static_cast<int64_t>(a.i1);
  if (s == 0.0f) return static_cast<int64_t>(a.ib);
  const double lse = dadd(dmul(static_cast<double>(a.x1), p.inv_t), logS);
  const double ts = dsub(static_cast<double>(t), static_cast<double>(s));
  const double lhs = dadd(dsub(a.best, lse), log64(ts));
  const double g_mask = gumbel64(p.seed, p.offset, row_key, static_cast<uint32_t>(p.mask_index));
  const double rhs = dadd(log64(static_cast<double>(s)), g_mask);
  return lhs > rhs ? static_cast<int64_t>(a.ib) : p.mask_index;
}

// Row id -> Philox row word, flagging ids outside [0, 2^32).
MDLM_HD uint32_t row_key_of(const int64_t* row_ids, int64_t i, uint32_t& flags) {
  const int64_t r = row_ids != nullptr ? row_ids[i] : i;
  if (r < 0 || r > int64_t(0xFFFFFFFF)) {
    flags |= kFlagBadRowId;
    return 0u;
  }
  return static_cast<uint32_t>(r);
}

}  // namespace mdlm
