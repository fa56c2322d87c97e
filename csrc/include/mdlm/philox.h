// Philox4x32-10 counter-based RNG (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy
// as 1, 2, 3", SC 2011), written once as host/device code so that the CPU build and the CUDA build
// produce bit-identical streams. The Triton kernels (tl.philox) and the PyTorch reference in
// mdlm_kernels/ops/philox.py implement the same function and are tested for bit equality.
//
// KEYING CONVENTION (every stochastic kernel of mdlm-kernels uses it; do not change it):
//   key = { seed_lo32, seed_hi32 }                       (seed: uint64)
//   ctr = { col, row, offset_lo32, offset_hi32 }         (col, row: uint32; offset: uint64)
// Element (row, col) of a logically (rows, cols) row-major random array draws the four words
// philox4x32_10(ctr, key) and uses them (only) for itself. A kernel that needs several independent
// draws per element consumes successive words of that block, or advances `offset` (the caller's
// "offset" is the generator's position: a new step/call uses a new offset with the same seed).
//
// DEVICE-SIDE OFFSET (CUDA graphs: a captured launch freezes its host arguments, so the stream
// position can also live in memory and advance there). A kernel may receive, next to the host
// `offset`, a pointer to one int64 in the memory of the data it works on (nullptr: none); the
// effective offset is then
//   offset + uint64(*offset_ptr)  (mod 2^64; uint64() reinterprets the int64's two's complement bits,
//                                  so -1 adds 2^64 - 1, i.e. subtracts 1)
// read by the kernel itself when it runs (effective_offset below: every CPU twin and CUDA kernel
// calls it, so both agree bit for bit), never by the host at launch time.
//
// Uniforms: both helpers return values in the OPEN interval (0, 1), exactly representable, so
// log(u) and log(-log(u)) are always finite.
//   uniform53(w0, w1): x = (w0 >> 5) * 2^26 + (w1 >> 6)  (53 random bits, x in [0, 2^53))
//                      u = (x + 1/2) * 2^-53 rounded toward zero, i.e.
//                          x <  2^52: (x + 0.5) * 2^-53     (exact)
//                          x >= 2^52:  x        * 2^-53     (the midpoint is not representable:
//                                   round-to-nearest would return 1.0 for x = 2^53 - 1)
//                      -> u in [2^-54, 1 - 2^-53]; the 2^53 values of x map to 2^53 distinct doubles.
//   uniform24(w):      y = w >> 8 (24 bits), same rule at float32 precision:
//                          y < 2^23: (y + 0.5f) * 2^-24, else y * 2^-24  -> u in [2^-25, 1 - 2^-24].
// Every operation above is exact in IEEE arithmetic, so all implementations agree bit for bit.
#pragma once

#include "mdlm/common.h"

namespace mdlm {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplier for ctr[0]
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplier for ctr[2]
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // Weyl key increment (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // Weyl key increment (sqrt(3) - 1)

struct U32x4 {
  uint32_t x, y, z, w;
};

MDLM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// One Philox round (Random123 philox4x32round).
MDLM_HD U32x4 philox_round(U32x4 c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kPhiloxM0, c.x, hi0, lo0);
  mulhilo32(kPhiloxM1, c.z, hi1, lo1);
  return U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Philox4x32 with 10 rounds; the key is bumped between rounds.
MDLM_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    if (i > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    ctr = philox_round(ctr, k0, k1);
  }
  return ctr;
}

// The effective stream position (DEVICE-SIDE OFFSET above): unsigned addition wraps mod 2^64.
MDLM_HD uint64_t effective_offset(uint64_t offset, const int64_t* offset_ptr) {
  return offset_ptr == nullptr ? offset : offset + static_cast<uint64_t>(*offset_ptr);
}

// The convention above, for element (row, col).
MDLM_HD U32x4 philox_for_element(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col) {
  const U32x4 ctr{col, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

MDLM_HD double uniform53(uint32_t w0, uint32_t w1) {
  const uint64_t x = (static_cast<uint64_t>(w0 >> 5) << 26) | static_cast<uint64_t>(w1 >> 6);
  const double d = static_cast<double>(x);  // exact: x < 2^53
  const double m = (x < (uint64_t(1) << 52)) ? d + 0.5 : d;  // exact in both branches
  return m * 0x1p-53;  // power of two: exact
}

MDLM_HD float uniform24(uint32_t w) {
  const uint32_t y = w >> 8;
  const float f = static_cast<float>(y);  // exact: y < 2^24
  const float m = (y < (1u << 23)) ? f + 0.5f : f;
  return m * 0x1p-24f;
}

}  // namespace mdlm
