// Forward masking q(x_t | x_0) of MDLM, fused: per-row diffusion time t, noise schedule
// (sigma, dsigma), move chance 1 - exp(-sigma), loss weight dsigma / expm1(sigma), per-element
// masking decision and per-row masked count. Written once as host/device code: the CPU twin
// (csrc/cpu/masking_cpu.cpp) and the CUDA kernel (csrc/cuda/masking_cuda.cu) call the SAME
// functions below; the PyTorch reference (mdlm_kernels/ops/masking.py) follows them op for op.
//
// RANDOM NUMBERS (the keying convention of philox.h, unchanged; seed/offset are the caller's):
//   element draw  (row r, col c), c < L <= 2^32 - 1:
//       u_rc = uniform24(w0) of philox_for_element(seed, offset, r, c)      (float32, in (0, 1))
//       masked  <=>  u_rc < move_chance_r                                   (float32 compare)
//   row draw      (row r, col 0xFFFFFFFF = kRowDrawCol, RESERVED for row-level draws):
//       r_r  = uniform53(w0, w1) of philox_for_element(seed, offset, r, kRowDrawCol)  (float64)
//   Since L < 2^32, no element column ever equals kRowDrawCol, so the row draw is independent of
//   every element draw of the same (seed, offset). Other ops that need a row-level draw use the
//   same reserved column (with their own offset).
//
// TIME (when the caller does not pass t): computed in float64, returned as float32 (the published
// code holds t in float32); all the per-row math below runs in float64 from that float32 t.
//   antithetic:   u_i = (r_i / B + i / B) mod 1        (mod 1: u - 1 if u >= 1; exact)
//   otherwise:    u_i = r_i
//   t_i = (1 - sampling_eps) * u_i + sampling_eps
//
// SCHEDULES (formulas of mdlm/schedules.py, in float64):
//   loglinear  m = (1 - eps) t; sigma = -log1p(-m); dsigma = (1 - eps) / (1 - m)
//              move_chance = m (exact algebra: 1 - exp(-sigma) = m), weight = 1 / t (exact algebra:
//              dsigma / expm1(sigma) = 1 / t), so no transcendental enters move_chance or weight.
//   linear     sigma = smin + t (smax - smin); dsigma = smax - smin
//   geometric  sigma = smin^(1 - t) smax^t; dsigma = sigma (log smax - log smin)
//   cosine     c = cos(t pi / 2); sigma = -log(eps + (1 - eps) c);
//              dsigma = (pi / 2) ((1 - eps) sin(t pi / 2)) / ((1 - eps) c + eps)
//   cosinesqr  c = cos(t pi / 2); sigma = -log(eps + (1 - eps) c^2);
//              dsigma = (pi / 2) ((1 - eps) sin(t pi)) / ((1 - eps) c^2 + eps)
//   non-loglinear: move_chance = 1 - exp(-sigma), weight = dsigma / expm1(sigma).
//   sigma, weight and move_chance are returned rounded to float32.
//
// BIT IDENTITY, CPU twin vs CUDA:
//   * Arithmetic goes through dmul/dadd/dsub/ddiv below: on the device __dmul_rn etc., which nvcc
//     never contracts into FMA; on the host plain operators in translation units compiled with
//     -ffp-contract=off (setup.py; gcc would otherwise contract a*b+c on targets with FMA, e.g.
//     aarch64). Every such operation is correctly rounded IEEE on both sides.
//   * t (and therefore the xt of the loglinear schedule, whose move chance is (1 - eps) t) is
//     bit-identical on CPU and GPU.
//   * Transcendentals (log1p, exp, expm1, log, cos, sin, pow) come from libdevice on the GPU and
//     from the C library on the CPU (glibc; torch's vectorised CPU kernels use SLEEF) and may
//     differ by one float64 ulp. After rounding to float32, sigma / weight / move_chance of the
//     affected schedules then differ by at most one float32 ulp, rarely (~2^-29 per value); for
//     the non-loglinear schedules the masking decision of an element can then differ only if its
//     draw lands exactly on the 1-ulp-different threshold (probability ~2^-24 per row in which the
//     move chance differs). The per-element decision itself is a float32 compare: identical.
#pragma once

#include <cmath>

#include "mdlm/common.h"
#include "mdlm/philox.h"

namespace mdlm {

constexpr uint32_t kRowDrawCol = 0xFFFFFFFFu;  // reserved column of the row-level draw

enum Schedule : int {
  kLogLinear = 0,
  kLinear = 1,
  kGeometric = 2,
  kCosine = 3,
  kCosineSqr = 4,
};
constexpr int kNumSchedules = 5;

inline const char* schedule_name(int s) {
  switch (s) {
    case kLogLinear: return "loglinear";
    case kLinear: return "linear";
    case kGeometric: return "geometric";
    case kCosine: return "cosine";
    case kCosineSqr: return "cosinesqr";
    default: return "unknown";
  }
}

struct MaskParams {
  int schedule;         // Schedule
  double eps;           // loglinear / cosine / cosinesqr
  double sigma_min;     // linear / geometric
  double sigma_max;     // linear / geometric
  double sampling_eps;  // t = (1 - sampling_eps) u + sampling_eps
  int antithetic;       // 0 / 1
};

struct RowParams {
  float t, sigma, weight, move_chance;
};

// ---- non-contracting float64 arithmetic (see BIT IDENTITY above) ----------------------------
#if defined(__CUDA_ARCH__)
MDLM_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
MDLM_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
MDLM_HD double dsub(double a, double b) { return __dsub_rn(a, b); }
MDLM_HD double ddiv(double a, double b) { return __ddiv_rn(a, b); }
#else
// Host: the C++ sources are compiled with -ffp-contract=off (setup.py), so these are single correctly
// rounded IEEE operations that the compiler may still vectorise.
MDLM_HD double dmul(double a, double b) { return a * b; }
MDLM_HD double dadd(double a, double b) { return a + b; }
MDLM_HD double dsub(double a, double b) { return a - b; }
MDLM_HD double ddiv(double a, double b) { return a / b; }
#endif

// ---- float64 transcendentals: libdevice on the device, the C library on the host -------------
#if defined(__CUDA_ARCH__)
MDLM_HD double m_log1p(double x) { return ::log1p(x); }
MDLM_HD double m_log(double x) { return ::log(x); }
MDLM_HD double m_exp(double x) { return ::exp(x); }
MDLM_HD double m_expm1(double x) { return ::expm1(x); }
MDLM_HD double m_cos(double x) { return ::cos(x); }
MDLM_HD double m_sin(double x) { return ::sin(x); }
MDLM_HD double m_pow(double x, double y) { return ::pow(x, y); }
#else
MDLM_HD double m_log1p(double x) { return std::log1p(x); }
MDLM_HD double m_log(double x) { return std::log(x); }
MDLM_HD double m_exp(double x) { return std::exp(x); }
MDLM_HD double m_expm1(double x) { return std::expm1(x); }
MDLM_HD double m_cos(double x) { return std::cos(x); }
MDLM_HD double m_sin(double x) { return std::sin(x); }
MDLM_HD double m_pow(double x, double y) { return std::pow(x, y); }
#endif

constexpr double kPi = 3.141592653589793;  // math.pi

// t of row `row` (float64, before rounding to float32), see TIME above.
MDLM_HD double draw_time(uint64_t seed, uint64_t offset, uint32_t row, uint64_t rows, const MaskParams& p) {
  const U32x4 w = philox_for_element(seed, offset, row, kRowDrawCol);
  double u = uniform53(w.x, w.y);
  if (p.antithetic) {
    const double n = static_cast<double>(rows);  // exact: rows < 2^32
    u = dadd(ddiv(u, n), ddiv(static_cast<double>(row), n));
    if (u >= 1.0) u = dsub(u, 1.0);
  }
  return dadd(dmul(dsub(1.0, p.sampling_eps), u), p.sampling_eps);
}

// Everything a row needs, from its float32 time (see SCHEDULES above).
MDLM_HD RowParams row_params(float t32, const MaskParams& p) {
  const double t = static_cast<double>(t32);
  double sigma, dsigma, move_chance, weight;
  switch (p.schedule) {
    case kLogLinear: {
      const double a = dsub(1.0, p.eps);
      const double m = dmul(a, t);
      sigma = -m_log1p(-m);
      dsigma = ddiv(a, dsub(1.0, m));
      move_chance = m;
      weight = ddiv(1.0, t);
      break;
    }
    case kLinear: {
      const double d = dsub(p.sigma_max, p.sigma_min);
      sigma = dadd(p.sigma_min, dmul(t, d));
      dsigma = d;
      break;
    }
    case kGeometric: {
      sigma = dmul(m_pow(p.sigma_min, dsub(1.0, t)), m_pow(p.sigma_max, t));
      dsigma = dmul(sigma, dsub(m_log(p.sigma_max), m_log(p.sigma_min)));
      break;
    }
    case kCosine: {
      const double a = dsub(1.0, p.eps);
      const double x = ddiv(dmul(t, kPi), 2.0);
      const double c = dmul(a, m_cos(x));
      const double s = dmul(a, m_sin(x));
      sigma = -m_log(dadd(p.eps, c));
      dsigma = ddiv(dmul(kPi / 2, s), dadd(c, p.eps));
      break;
    }
    default: {  // kCosineSqr (validated by the callers)
      const double a = dsub(1.0, p.eps);
      const double x = ddiv(dmul(t, kPi), 2.0);
      const double cx = m_cos(x);
      const double c = dmul(a, dmul(cx, cx));
      const double s = dmul(a, m_sin(dmul(t, kPi)));
      sigma = -m_log(dadd(p.eps, c));
      dsigma = ddiv(dmul(kPi / 2, s), dadd(c, p.eps));
      break;
    }
  }
  if (p.schedule != kLogLinear) {
    move_chance = dsub(1.0, m_exp(-sigma));
    weight = ddiv(dsigma, m_expm1(sigma));
  }
  return RowParams{t32, static_cast<float>(sigma), static_cast<float>(weight), static_cast<float>(move_chance)};
}

// Row parameters from a given t (t_in != nullptr) or from the row draw.
MDLM_HD RowParams row_params_for(const float* t_in, uint64_t seed, uint64_t offset, uint32_t row, uint64_t rows,
                                 const MaskParams& p) {
  const float t32 = t_in != nullptr ? t_in[row] : static_cast<float>(draw_time(seed, offset, row, rows, p));
  return row_params(t32, p);
}

// The masking decision of element (row, col).
MDLM_HD bool element_masked(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col, float move_chance) {
  const U32x4 w = philox_for_element(seed, offset, row, col);
  return uniform24(w.x) < move_chance;
}

}  // namespace mdlm
