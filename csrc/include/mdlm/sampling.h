// Fused categorical sampling step of MDLM (ancestral step t -> s, loglinear schedule), written once
// as host/device code: the CPU twin (csrc/cpu/sampling_cpu.cpp) and the CUDA kernel
// (csrc/cuda/sampling_cuda.cu) call the SAME functions below with the SAME reduction order, so they
// return bit-identical tokens and confidences. The float64 PyTorch reference (mdlm_kernels/ops/sampling.py)
// is the spec of the law.
//
// THE DISTRIBUTION (row i of the (N, V) logits, the rows of masked positions):
//   d_v   = (x_v - m) * inv_t           (exact arithmetic in the spec; the kernel's arithmetic: WEIGHTS below)
//   p     = softmax over the KEPT classes K = { v != MASK : key(x_v) >= kappa, x_v > -inf }
//   draw  from the unnormalised categorical { v in K: p_v (t - s) } U { MASK: s }
//   greedy: the argmax of x over K (ties -> lowest index); t, s and the RNG are not used.
//
// INVERSE CDF, ONE RANDOM BLOCK PER ROW, THE LOGITS READ ONCE (+ TWO 512-COLUMN CHUNKS):
//   (u1, u2) = (uniform53(w.x, w.y), uniform53(w.z, w.w)), w = Philox element (row = row_ids[i] (default i),
//   col = 0xFFFFFFFF, the reserved row-draw column of masking.h) at (seed, offset): two independent 53-bit
//   uniforms in (0, 1). The MASK competitor wins iff s > 0 and u1 < s / t (P = s / t: the MASK weight s
//   against the total (t - s) + s). Otherwise the class is found by inversion of u2 in two levels:
//   Pass 1 splits the row into chunks of kChunkCols = 512 columns (a warp of 32 lanes x 16 columns, interleaved:
//   lane l holds columns 512c + 32k + l, k = 0..15): per chunk c its maximum m_c, s_c = sum w (relative to m_c) and
//   h_c = sum w d (entropy), with float32 per-element weights (WEIGHTS) and float32 sums in the fixed order below.
//   The row then scales each chunk by e_c = exp((m_c - m) inv_t) (float64), takes the float64 prefix sums P_c of
//   S_c = s_c e_c (Z = the total), picks the chunk with P_{c-1} <= u2 Z < P_c, and pass 2 re-reads THAT chunk only:
//   with tau = u2 Z - P_{c-1} (tau < S_c), thr = (tau / S_c) T where T is the chunk's float64 total of the same
//   float32 weights, and the class is the first column v (column order) with w_v > 0 whose float64 prefix within
//   the chunk exceeds thr (if rounding leaves none, the chunk's last column with w > 0). So
//     P(class v) = (S_c / Z) (w_v / T)     up to the float64 rounding of the prefix sums (~2^-52 Z):
//   the chunk's share from pass 1, the class's share within the chunk from float64 sums of the same weights. The
//   chunk must be LIVE (S_c > 0, see pick_chunk): the rounded P_c are not monotone in c (the Hillis-Steele sums of
//   neighbouring lanes associate differently), so an empty chunk can carry a P_c above its predecessor's. When
//   rounding leaves no live chunk with P_c > u2 Z, the last live chunk (its last column with w > 0).
//   Memory traffic: V logits + 2 x 512 per row (no top-k / top-p): pass 1b re-reads the chunk of the row maximum.
//
//   MAXIMUM'S CHUNK (pass 1b, between pass 1 and the scaling): the first chunk holding the row maximum is re-read
//   for the row's top two (greedy token, margin) and its mass s_c is replaced by its float64 total T (chunk_mass):
//   that chunk holds the weight 1 of the maximum, next to which a float32 sum loses 2^-24 absolutely -- log Z and
//   the entropy of a peaked row would inherit it. The other chunks' float32 masses err relative to their own mass.
//
//   WEIGHTS: per element w = weight32(x, m_c) = 2^d2 with d2 = (x - m_c) scale2 in float32 (scale2 =
//   float32(log2(e) / T), set on the host: the law drawn is the categorical at temperature 1 / (scale2 ln2), within
//   2^-24 of T), clamped at -127; d2 = k + r exactly (k = round(d2) by the magic-number add, r = d2 - k, |r| <= 1/2),
//   2^r by a degree-6 minimax float32 polynomial (truncation 2^-25.9 with float32 coefficients, c0 = 1), times 2^k
//   through the exponent bits, where k = -127 gives the scale 0: w = 0 for d2 < -126.5 (a class e^-87.7 = 9e-39
//   below its chunk's maximum) and for -inf logits. Relative error of w against 2^d2 for the float32 d2: <= 2^-22
//   (measured 2^-23.6 where w is normal, 2^-22.8 where it is subnormal, d2 in (-126.5, -126)); d2 itself carries <= |d2| 2^-23 (two float32 roundings), so w against the exact weight errs
//   by <= 2^-22 + |d| 2^-23 (d = d2 ln2, nats). The entropy sum h accumulates w d2 (base 2; times ln2 per chunk
//   in float64). The chunk scales e_c and the confidences use exp_weight (float64 range reduction, float32
//   polynomial: <= 2^-22 relative for every d, flushed to 0 below -708.3). Law: with the float32 chunk sums
//   (<= 9 roundings, < 2^-20.8 relative) a class's probability is p_v (1 + eps_v), |eps_v| <= ~2^-19.5 + |d_v| 2^-22
//   (d_v its gap to its chunk's maximum, nats); the 53-bit uniform resolves probabilities far below that (a 1e-9
//   class, |d| <= 20.7, is drawn at rate 1e-9 (1 +- 7e-6)). The float64 reference (mdlm_kernels/ops/sampling.py)
//   is the spec; the tests compare tokens exactly on fixed seeds (a token differs only where u2 Z lands within
//   ~2^-19 of a class boundary). Subnormal weights (k = -126) and subnormal logits are exact IEEE arithmetic on
//   both sides; a host thread that flushes subnormals (torch.set_flush_denormal(True)) can make the CPU twin
//   differ from the GPU in such rows.
//
// REDUCTION ORDER (the bit-identity contract): pass 1, within a chunk: the lane maximum is max_nan over k (any
//   order: max is exact), the chunk maximum the xor butterfly of max_nan (for o = 16, 8, 4, 2, 1:
//   x_l = max_nan(x_l, x_{l^o})), then + 0.0f (-0 -> +0); the lane's float32 sum is the pairwise tree
//   ((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7)), ... (lane_weights), h = fma(w_k, d_k, h) for k = 0..15 (h = 0
//   with SampleParams::entropy = 0); the
//   chunk's s_c and h_c are float32 xor butterflies (x_l += x_{l^o}: every lane ends with the same value),
//   widened to float64. Over chunks: groups of 32 consecutive chunks are scanned by the inclusive float64
//   Hillis-Steele scan (for o = 1, 2, 4, 8, 16: x_l += x_{l-o} for l >= o, from the previous step's values),
//   group totals are added sequentially (G_0 = 0, G_{g+1} = G_g + T_g) and P_c = G_g + scan_c; Z = G_{n_groups}.
//   The row's H is summed sequentially over groups of the float64 butterfly totals of e_c (h_c + delta_c s_c).
//   Pass 2 (and pass 1b's T): T = the float64 xor butterfly of each lane's sequential float64 sum over k; the
//   prefix of column 512c + 32k + l is C_k + I_k(l), I_k the inclusive Hillis-Steele scan of the k-th weights over
//   lanes, C_0 = 0, C_{k+1} = C_k + I_k(31). The CUDA kernel runs these as warp shuffles, the CPU twin on arrays:
//   every operation is a correctly rounded IEEE add, multiply or fma (non-contracting helpers), so both give the
//   same bits.
//
// TOP-K / TOP-P (thresholds on the logits, no sort, a fixed number of passes): key(x) maps float32 to uint32
//   monotonically (-0 -> +0). Counts and masses run over v != MASK (x = -inf counts, with mass 0).
//   top-k (0 < k < V - 1): kappa_k = the key of the k-th largest logit (TIES AT THE THRESHOLD ARE KEPT:
//          possibly more than k), found by a radix select over the key's digits (11, 11, 10 bits): three
//          histogram passes of exact integer counts.
//   top-p (0 < p < 1), applied after top-k on p renormalised over the top-k set: v is kept iff the
//          probability mass STRICTLY above v is < p (the top class is always kept; ties at the threshold
//          are kept). The masses w_v = exp_weight((x_v - x_max) inv_t) enter as fixed-point integers
//          round(w 2^40) (exact, order-free sums, so the CUDA kernel can use shared-memory atomics and stay
//          bit-identical to the CPU twin), then the same three-level radix descent. exp_weight is within 2^-22
//          of exp and the fixed point moves a class's mass by <= 2^-41 of the top class's: the kept set can
//          differ from exact arithmetic only when the mass above a class lies within ~2^-22 Z of p Z.
//   Passes over the row: top-k 3, top-p 1 (row maximum) + 3, both 6; then the sampling pass. (The earlier
//   kernel bisected: up to 32 passes each, an exp64 per element per top-p pass.)
//
// CONFIDENCE (float32, of p over K): [max probability 1 / Z, margin (1 - w(x2)) / Z with x2 the second largest
//   kept logit (w = 0 when one class is kept), entropy in nats log Z - H / Z with H = sum w d]. x1, x2 and the
//   argmax (greedy, lowest index on ties) come from the chunk maxima and pass 1b (row_top2). With
//   SampleParams::entropy = 0 the entropy is not computed (NaN): h is the only per-element term that nothing
//   else needs (one fma per element and one butterfly per chunk of pass 1, ~7% of its instructions on sm_90).
//
// INVALID ROWS -> token -1 and confidence NaN (flags, never a host sync): a NaN or +inf logit at a
//   non-MASK column; no kept class with a logit > -inf; row id outside [0, 2^32); and unless greedy:
//   not (0 <= s < t <= 1) (NaN included). The MASK column's logit is never read.
//
// ARITHMETIC: every float op on the decision path goes through non-contracting helpers (dmul/dadd/dsub/ddiv of
//   masking.h for float64, fmul_nc/fadd_nc/fsub_nc below for float32: __*_rn on the device, plain operators
//   under -ffp-contract=off on the host), and the transcendentals are implemented here with those helpers
//   (log64, exp64, expf32, exp_weight, weight32; fma_rn is the correctly rounded fma on both sides), so
//   libdevice vs glibc differences cannot enter. Accuracy (tests/test_sampling_kernel.py measures it): log64,
//   exp64 <= 1 ulp; expf32 <= 1 float32 ulp; exp_weight and weight32 <= 2^-22 relative.
#pragma once

#include "mdlm/common.h"
#include "mdlm/masking.h"  // dmul / dadd / dsub / ddiv (non-contracting float64 arithmetic)
#include "mdlm/philox.h"

namespace mdlm {

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
  // Set on the host by with_scales (the CPU twin's and the CUDA launcher's entry points, so the kernel reads them
  // from its parameters): scale2 = float32(inv_t log2 e) (FLT_MAX when larger: the limit T -> 0), the per-element
  // scale into base-2 exponents; inv_t_w = double(scale2) ln2 (rounded once) scales the chunk gaps and the
  // confidences, so the law drawn is the categorical at temperature 1 / (scale2 ln2), within 2^-24 of T.
  // (The top-p masses use inv_t.)
  float scale2 = 0.0f;
  double inv_t_w = 0.0;
  // 0: skip the entropy (confidence[2] is NaN): pass 1 then saves an fma per element and a butterfly per chunk.
  // Tokens and the other confidences do not depend on it (the samplers never read the entropy).
  int entropy = 1;
};

constexpr double kLn2d = 0.6931471805599453;  // ln 2 rounded to float64
constexpr double kLog2e = 1.4426950408889634;

// p with offset := effective_offset(p.offset, p.offset_ptr) and offset_ptr := nullptr (idempotent).
MDLM_HD SampleParams resolve_offset(SampleParams p) {
  p.offset = effective_offset(p.offset, p.offset_ptr);
  p.offset_ptr = nullptr;
  return p;
}

// p with scale2 and inv_t_w set (idempotent; host side: see SampleParams).
MDLM_HD SampleParams with_scales(SampleParams p) {
  const double s = p.inv_t * kLog2e;  // inv_t > 0 (checked by the callers)
  p.scale2 = s < 3.4028234663852886e38 ? static_cast<float>(s) : 3.4028234663852886e38f;
  p.inv_t_w = static_cast<double>(p.scale2) * kLn2d;
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

// exp(r) for |r| <= ~0.35: degree-7 Taylor polynomial in float32 (truncation < 2^-27 relative), Horner with
// separately rounded multiplies and adds (expf32 and exp_weight).
MDLM_HD float taylor7_exp(float r) {
  float p = 1.0f / 5040.0f;
  p = fadd_nc(1.0f / 720.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 120.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 24.0f, fmul_nc(r, p));
  p = fadd_nc(1.0f / 6.0f, fmul_nc(r, p));
  p = fadd_nc(0.5f, fmul_nc(r, p));
  p = fadd_nc(1.0f, fmul_nc(r, p));
  return fadd_nc(1.0f, fmul_nc(r, p));
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
  float p = taylor7_exp(r);
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

// Load a logit as float32 as stored (the full-chunk path of pass 1: no per-element checks; the sign of a zero
// never matters there, see lane_load).
template <typename T>
MDLM_HD float load_logit_raw(const T* p, int64_t v);

template <>
MDLM_HD float load_logit_raw<float>(const float* p, int64_t v) {
  return p[v];
}

template <>
MDLM_HD float load_logit_raw<uint16_t>(const uint16_t* p, int64_t v) {
  return bf16_bits_to_float(p[v]);
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

// max(a, b) propagating NaN (PTX max.NaN on sm_80+; the NaN's payload is never read: it only flags the row).
MDLM_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  if (is_nan32(a) || is_nan32(b)) return bits_as_float(0x7FFFFFFFu);
  return a > b ? a : b;
#endif
}

// ---- weights ------------------------------------------------------------------------------------
// exp(d) for d <= 0 (see WEIGHTS): float64 range reduction d = k ln2 + r, float32 degree-7 polynomial in r,
// scaled by 2^k. 0 for d < -708.3 (and for d = -inf); NaN stays NaN. Used per CHUNK (the chunk scales e_c),
// for the confidences and for the top-p masses; the per-element weights are weight32 below.
MDLM_HD double exp_weight(double d) {
  if (d != d) return d;
  if (d < -708.3) return 0.0;
  double kd = dadd(dmul(d, kInvLn2), 0.5);
#if defined(__CUDA_ARCH__)
  kd = ::floor(kd);
#else
  kd = std::floor(kd);
#endif
  const float r = static_cast<float>(dsub(dsub(d, dmul(kd, kLn2Hi)), dmul(kd, kLn2Lo)));  // |r| <= ~0.347
  const float q = taylor7_exp(r);
  int k = static_cast<int>(kd);  // in [-1022, 1] for d <= 0.35
  if (k < -1022) return 0.0;
  if (k > 1023) k = 1023;
  return dmul(static_cast<double>(q), bits_as_double(static_cast<uint64_t>(k + 1023) << 52));
}

// d = (x - m) inv_t in float64 for finite float32 x, m: x - m is exact in float64 unless the binary exponents
// of x and m differ by more than 29 (then it is rounded once, relative error <= 2^-53); the product is rounded once.
MDLM_HD double scaled_gap(float x, float m, double inv_t) {
  return dmul(dsub(static_cast<double>(x), static_cast<double>(m)), inv_t);
}

// Fused multiply-add, one rounding (the device intrinsic; the C library's correctly rounded fmaf on the host).
MDLM_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

// Per-element weight in float32 (see WEIGHTS): w = 2^d2, d2 = (x - m) scale2 (two float32 roundings), clamped at
// -127 (also x = -inf and NaN); d2 = k + r with k = round(d2) (magic-number rounding: exact) and r = d2 - k exact,
// |r| <= 1/2; 2^r by a degree-6 minimax float32 polynomial (c0 = 1: w = 1 exactly at d2 = 0); times 2^k built in
// the exponent bits, where k = -127 gives the scale +0 (w = 0 for d2 < -126.5, e^-87.7 = 9e-39; k = -126 can give
// a subnormal w: exact IEEE arithmetic on both sides, unless the host flushes subnormals). d2 is returned clamped,
// so w * d2 is finite.
constexpr float kWeightFloor = -127.0f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (d + magic) - magic = round(d) for |d| < 2^22
// 2^r on |r| <= 1/2: minimax (relative) degree 6, coefficients rounded to float32: error 2^-25.9 (mpmath Remez)
constexpr float kExp2C1 = 0x1.62e430p-1f, kExp2C2 = 0x1.ebfbdap-3f, kExp2C3 = 0x1.c6aed4p-5f,
                kExp2C4 = 0x1.3b2dbcp-7f, kExp2C5 = 0x1.5f456ap-10f, kExp2C6 = 0x1.41d334p-13f;

MDLM_HD float weight32(float x, float m, float scale2, float& d2) {
  float dd = fmul_nc(fsub_nc(x, m), scale2);
  dd = dd > kWeightFloor ? dd : kWeightFloor;  // NaN -> floor as well
  const float tk = fadd_nc(dd, kRoundMagic);   // magic + k exactly (|k| <= 127)
  const float r = fsub_nc(dd, fsub_nc(tk, kRoundMagic));
  float q = kExp2C6;
  q = fma_rn(q, r, kExp2C5);
  q = fma_rn(q, r, kExp2C4);
  q = fma_rn(q, r, kExp2C3);
  q = fma_rn(q, r, kExp2C2);
  q = fma_rn(q, r, kExp2C1);
  q = fma_rn(q, r, 1.0f);
  // 2^k = bits((k + 127) << 23); bits(tk) << 23 == k << 23 (mod 2^32) as magic's low 9 bits are 0; k = -127 -> +0
  const float scale = bits_as_float((float_as_bits(tk) << 23) + 0x3F800000u);
  d2 = dd;
  return fmul_nc(q, scale);
}

// ---- chunks, lanes and the fixed reduction order -----------------------------------------------------
constexpr int kWarpLanes = 32;
constexpr int kLaneCols = 16;
constexpr int kChunkCols = kWarpLanes * kLaneCols;  // 512
constexpr int64_t kMaxVocab = int64_t(1) << 19;     // chunk tables of 1024 chunks: 21 KB of CUDA shared memory

// Column of lane l's k-th value in chunk c: lanes interleave (a warp's load k reads 32 consecutive columns).
// 32-bit: V <= kMaxVocab.
MDLM_HD int lane_col(int c, int l, int k) { return c * kChunkCols + k * kWarpLanes + l; }

// A chunk takes the full path (no per-element checks) iff all its columns exist, MASK is not among them and no
// top-k / top-p key filters the row (a row's chunk grid, set once per row).
struct ChunkGrid {
  int n_full;      // chunks with all 512 columns < V
  int mask_chunk;  // the chunk holding MASK
  bool keep_all;   // no key filter (keep_key == 0)
  MDLM_HD bool full(int c) const { return keep_all && c < n_full && c != mask_chunk; }
};

MDLM_HD ChunkGrid chunk_grid(int64_t V, uint32_t mask, uint32_t keep_key) {
  return ChunkGrid{static_cast<int>(V / kChunkCols), static_cast<int>(mask / kChunkCols), keep_key == 0u};
}

// Largest and second largest kept logit (with multiplicity) and the lowest index of the largest.
struct Top2 {
  float x1, x2;
  uint32_t i1;
};

MDLM_HD Top2 top2_init() { return Top2{-inf32(), -inf32(), kNoIndex}; }

MDLM_HD void top2_add(Top2& a, float x, uint32_t v) {  // v increases from call to call
  if (x > a.x1) {
    a.x2 = a.x1;
    a.x1 = x;
    a.i1 = v;
  } else if (x > a.x2) {
    a.x2 = x;
  }
}

MDLM_HD Top2 top2_combine(Top2 a, const Top2& b) {  // order-free (ties -> lowest index)
  const float lo1 = a.x1 < b.x1 ? a.x1 : b.x1;
  const float hi2 = a.x2 > b.x2 ? a.x2 : b.x2;
  if (b.x1 > a.x1 || (b.x1 == a.x1 && b.i1 < a.i1)) {
    a.x1 = b.x1;
    a.i1 = b.i1;
  }
  a.x2 = lo1 > hi2 ? lo1 : hi2;
  return a;
}

// Load lane l's 16 values of chunk c (row x of length V: a logits pointer, or anything with load_logit /
// load_logit_raw overloads, e.g. the CPU twin's load-counting row). Full chunk: the values as stored. Otherwise
// -inf for a column that is beyond V, is MASK, is -inf or whose key is < keep_key; NaN and +inf pass (the lane
// maximum max_nan then flags the row). The sign of a zero differs between the paths (-0 stays -0 in a full
// chunk); it changes no output: d = (x - m) inv_t is +-0 either way and w(+-0) = 1.
template <typename Row>
MDLM_HD void lane_load(const Row& x, int c, int l, int64_t V, uint32_t mask, uint32_t keep_key, bool full,
                       float out[kLaneCols]) {
  if (full) {
#pragma unroll
    for (int k = 0; k < kLaneCols; ++k) out[k] = load_logit_raw(x, lane_col(c, l, k));
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) {
    const int v = lane_col(c, l, k);
    out[k] = -inf32();
    if (v >= V || v == int64_t(mask)) continue;
    const float xv = load_logit(x, v);
    if (!bad_logit(xv) && (xv == -inf32() || float_key(xv) < keep_key)) continue;
    out[k] = xv;
  }
}

// The lane's maximum, NaN if any value is NaN (+inf if any is +inf and none NaN).
MDLM_HD float lane_max(const float xs[kLaneCols]) {
  float m = xs[0];
#pragma unroll
  for (int k = 1; k < kLaneCols; ++k) m = max_nan(m, xs[k]);
  return m;
}

// The lane's weights relative to the chunk maximum m (w = 0 for -inf), their sum s as a fixed pairwise tree
// ((w0 + w1) + (w2 + w3)) + ... over k (float32), and h = sum w d2 as an fma chain over k = 0..15 (base-2 units:
// the chunk's h is converted to nats, h ln2, in float64 when stored). kEntropy false: h = 0, not computed (the
// weights and s are the same bits either way).
template <bool kEntropy = true>
MDLM_HD void lane_weights(const float xs[kLaneCols], float m, float scale2, float w[kLaneCols], float& s, float& h) {
  float pair[kLaneCols / 2];
  h = 0.0f;
#pragma unroll
  for (int k = 0; k < kLaneCols; k += 2) {
    float d0, d1;
    w[k] = weight32(xs[k], m, scale2, d0);
    w[k + 1] = weight32(xs[k + 1], m, scale2, d1);
    pair[k / 2] = fadd_nc(w[k], w[k + 1]);
    if (kEntropy) {
      h = fma_rn(w[k], d0, h);
      h = fma_rn(w[k + 1], d1, h);
    }
  }
  const float q0 = fadd_nc(fadd_nc(pair[0], pair[1]), fadd_nc(pair[2], pair[3]));
  const float q1 = fadd_nc(fadd_nc(pair[4], pair[5]), fadd_nc(pair[6], pair[7]));
  s = fadd_nc(q0, q1);
}

// Pass 2: the lane's float64 total of its weights, sequential over k (the chunk's column total T is the xor
// butterfly of these over the lanes).
MDLM_HD double lane_total64(const float w[kLaneCols]) {
  double t = static_cast<double>(w[0]);
#pragma unroll
  for (int k = 1; k < kLaneCols; ++k) t = dadd(t, static_cast<double>(w[k]));
  return t;
}

// The chunk's mass s_c relative to its maximum (see MAXIMUM'S CHUNK): the float32 butterfly total s32, except for
// the first chunk holding the row maximum, whose float64 total t64 (lane_total64, butterfly) is used.
MDLM_HD double chunk_mass(float s32, double t64, bool max_chunk) { return max_chunk ? t64 : static_cast<double>(s32); }

// Lane top two (pass 1b): v = lane_col(c, l, k) increases with k.
MDLM_HD void lane_top2(const float xs[kLaneCols], int c, int l, Top2& t) {
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) top2_add(t, xs[k], static_cast<uint32_t>(lane_col(c, l, k)));
}

// The chunk's entropy sum in nats from the float32 base-2 sum h2 (float64).
MDLM_HD double chunk_h_nats(float h2) { return dmul(static_cast<double>(h2), kLn2d); }

// The row's top two (CONFIDENCE, greedy) from pass 1's top two over the chunk maxima (i1: the first chunk holding
// the maximum) and pass 1b's top two within that chunk: the maximum and its lowest index come from the chunk, the
// second largest is the larger of the chunk's own and the other chunks' largest (with multiplicity).
MDLM_HD Top2 row_top2(const Top2& chunks, const Top2& in_chunk) {
  Top2 r = in_chunk;
  r.x2 = in_chunk.x2 > chunks.x2 ? in_chunk.x2 : chunks.x2;
  return r;
}

// Chunk scale e_c = exp((m_c - m) inv_t) and the chunk's scaled sums S = s e, H = e (h + delta s) relative to
// the row maximum m (an empty chunk, s = 0, gives 0 and 0).
MDLM_HD void chunk_scaled(float m_c, double s_c, double h_c, float m, double inv_t, double& e, double& S, double& H) {
  if (s_c == 0.0) {
    e = 0.0;
    S = 0.0;
    H = 0.0;
    return;
  }
  const double delta = scaled_gap(m_c, m, inv_t);
  e = exp_weight(delta);
  S = dmul(s_c, e);
  H = dmul(e, dadd(h_c, dmul(delta, s_c)));
}

// The row's two uniforms (see INVERSE CDF).
MDLM_HD void row_uniforms(uint64_t seed, uint64_t offset, uint32_t row_key, double& u1, double& u2) {
  const U32x4 w = philox_for_element(seed, offset, row_key, kRowDrawCol);
  u1 = uniform53(w.x, w.y);
  u2 = uniform53(w.z, w.w);
}

// A chunk is LIVE iff it holds a kept column whose weight relative to the row maximum m is > 0, i.e. its scaled
// sum S_c = s_c e_c > 0 (s_c >= 1: the chunk maximum's own weight is weight32(0) = 1; e_c > 0 iff exp_weight
// of the chunk's gap is). m_c: the chunk maximum (-inf: no kept column).
MDLM_HD bool chunk_live(float m_c, float m, double inv_t) {
  return m_c != -inf32() && exp_weight(scaled_gap(m_c, m, inv_t)) > 0.0;
}

// The chunk of the draw (see INVERSE CDF): the first live chunk c (column order) with P_c = G_g + scan_c > target,
// and tau = target - P_{c-1} (the within-chunk threshold of pass 2); when rounding leaves none, the last live
// chunk with tau = +inf (pass 2 then takes its last column with w > 0, as the reference takes the last class
// with w > 0). G (ng + 1): the group prefixes; S (ng * 32): the group-local inclusive scans of the S_c; M (nc):
// the chunk maxima; m: the row maximum. Returns -1 only when no chunk is live (not a valid row). The CPU twin and
// the CUDA kernel (thread 0) both call this: same operations, same bits.
MDLM_HD int64_t pick_chunk(const double* G, const double* S, const float* M, int64_t ng, int64_t nc, float m,
                           double inv_t, double target, double& tau) {
  for (int64_t g = 0; g < ng; ++g) {
    if (!(G[g + 1] > target)) continue;  // G is monotone (sequential sums of S_c >= 0)
    for (int l = 0; l < kWarpLanes; ++l) {
      const int64_t c = g * kWarpLanes + l;
      if (c >= nc) break;
      if (dadd(G[g], S[c]) > target && chunk_live(M[c], m, inv_t)) {
        tau = dsub(target, l == 0 ? G[g] : dadd(G[g], S[c - 1]));
        return c;
      }
    }
  }
  tau = inf64();
  for (int64_t c = nc - 1; c >= 0; --c) {
    if (chunk_live(M[c], m, inv_t)) return c;
  }
  return -1;
}

// MASK stays: s > 0 and u1 < s / t (t, s valid times).
MDLM_HD bool draws_mask(double u1, float t, float s) {
  return s > 0.0f && u1 < ddiv(static_cast<double>(s), static_cast<double>(t));
}

// Pass 2's threshold within the chosen chunk (see INVERSE CDF): the draw's position tau in the chunk's pass-1 mass
// S_c = s_c e_c, carried over to the chunk's float64 column total T: thr = (tau / S_c) T (+inf when tau is).
MDLM_HD double chunk_threshold(double tau, double S_c, double T) { return dmul(ddiv(tau, S_c), T); }

// Confidences (see CONFIDENCE) from the row's top two logits, Z and H; entropy 0: conf[2] = NaN (not computed).
MDLM_HD void row_confidences(const Top2& t2, double Z, double H, double inv_t, int entropy, float conf[3]) {
  const double w2 = t2.x2 == -inf32() ? 0.0 : exp_weight(scaled_gap(t2.x2, t2.x1, inv_t));
  conf[0] = static_cast<float>(ddiv(1.0, Z));
  conf[1] = static_cast<float>(ddiv(dsub(1.0, w2), Z));
  if (!entropy) {
    conf[2] = bits_as_float(0x7FC00000u);
    return;
  }
  const double ent = dsub(log64(Z), ddiv(H, Z));
  conf[2] = static_cast<float>(ent > 0.0 ? ent : 0.0);
}

// Row flags that do not depend on the logits; greedy ignores the times.
MDLM_HD uint32_t time_flags(float t, float s, int greedy) {
  return (!greedy && !(s >= 0.0f && s < t && t <= 1.0f)) ? kFlagBadTime : 0u;
}

MDLM_HD void nan_confidences(float conf[3]) {
  const float nan = bits_as_float(0x7FC00000u);
  conf[0] = conf[1] = conf[2] = nan;
}

// ---- top-k / top-p thresholds: radix descent over the key's digits ----------------------------------
constexpr int kRadixLevels = 3;
constexpr int kRadixBins = 2048;  // 11 bits (the last level uses 10)

MDLM_HD int radix_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
MDLM_HD uint32_t radix_mask(int level) { return level == 2 ? 0x3FFu : 0x7FFu; }
MDLM_HD int radix_bins(int level) { return level == 2 ? 1024 : 2048; }
// bits of the key already fixed before `level` (a prefix that candidates must match)
MDLM_HD uint32_t radix_prefix_mask(int level) { return level == 0 ? 0u : (level == 1 ? 0xFFE00000u : 0xFFFFFC00u); }
MDLM_HD uint32_t radix_digit(uint32_t key, int level) { return (key >> radix_shift(level)) & radix_mask(level); }

// Fixed-point mass of a top-p weight (w in [0, 1]): round(w 2^40).
MDLM_HD uint64_t mass_fixed(double w) { return static_cast<uint64_t>(dadd(dmul(w, 1099511627776.0), 0.5)); }

// top-p weight of a candidate logit (not NaN / +inf): w relative to the row maximum; 0 for -inf.
MDLM_HD double top_p_weight(float x, float x_max, double inv_t) {
  if (x == -inf32()) return 0.0;
  return exp_weight(scaled_gap(x, x_max, inv_t));
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
