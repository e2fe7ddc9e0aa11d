// Deterministic elementary functions for the projection generator.
//
// libm's log/cos are not guaranteed to round the same way on every machine (glibc versions, other
// libcs, CUDA), and one ulp of difference in a Gaussian draw can flip a float32 bit of the final
// projections. These use only +, -, *, / and sqrt — each correctly rounded by IEEE 754 — in a fixed
// order, so they give the same bits everywhere (compiled with -ffp-contract=off, no -ffast-math).
// Accuracy is a few ulp, far below what a Gaussian sampler needs.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/philox.h"

namespace uora::kernels {

// Natural log of x in (0, 1].
inline double det_log(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact: x = m * 2^e, m in [0.5, 1)
  if (m < 0.70710678118654752440) {
    m = m * 2.0;  // exact
    e -= 1;
  }
  // m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
  const double f = m - 1.0;  // exact (Sterbenz)
  const double s = f / (2.0 + f);
  const double s2 = s * s;
  // 1 + s2/3 + s2^2/5 + ... + s2^11/23: the next term is below 2^-53 relative for |s| <= 0.1716.
  double p = 1.0 / 23.0;
  p = p * s2 + 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0;
  p = p * s2 + 1.0 / 17.0;
  p = p * s2 + 1.0 / 15.0;
  p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // high bits of ln 2, exact times small e
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const double de = static_cast<double>(e);
  return de * kLn2Hi + (de * kLn2Lo + 2.0 * s * p);
}

// sin and cos of a in [0, pi/4], by Taylor series (terms beyond a^17 / a^18 are below 2^-60).
inline void det_sincos_small(double a, double* s_out, double* c_out) {
  const double a2 = a * a;
  double s = 1.0 / 355687428096000.0;  // 1/17!
  s = s * -a2 + 1.0 / 1307674368000.0;  // 1/15!
  s = s * -a2 + 1.0 / 6227020800.0;     // 1/13!
  s = s * -a2 + 1.0 / 39916800.0;       // 1/11!
  s = s * -a2 + 1.0 / 362880.0;         // 1/9!
  s = s * -a2 + 1.0 / 5040.0;           // 1/7!
  s = s * -a2 + 1.0 / 120.0;            // 1/5!
  s = s * -a2 + 1.0 / 6.0;              // 1/3!
  s = s * -a2 + 1.0;
  double c = 1.0 / 6402373705728000.0;  // 1/18!
  c = c * -a2 + 1.0 / 20922789888000.0;  // 1/16!
  c = c * -a2 + 1.0 / 87178291200.0;     // 1/14!
  c = c * -a2 + 1.0 / 479001600.0;       // 1/12!
  c = c * -a2 + 1.0 / 3628800.0;         // 1/10!
  c = c * -a2 + 1.0 / 40320.0;           // 1/8!
  c = c * -a2 + 1.0 / 720.0;             // 1/6!
  c = c * -a2 + 1.0 / 24.0;              // 1/4!
  c = c * -a2 + 0.5;                     // 1/2!
  c = c * -a2 + 1.0;
  *s_out = a * s;
  *c_out = c;
}

// sin and cos of 2*pi*u for u in [0, 1). The reduction works on u, where it is exact.
inline void det_sincos_2pi(double u, double* s_out, double* c_out) {
  const double v = u * 4.0;  // exact
  const int q = static_cast<int>(v);  // quadrant 0..3
  const double f = v - static_cast<double>(q);  // exact, in [0, 1)
  constexpr double kHalfPi = 1.57079632679489661923;
  double s, c;
  if (f <= 0.5) {
    det_sincos_small(f * kHalfPi, &s, &c);
  } else {
    det_sincos_small((1.0 - f) * kHalfPi, &c, &s);  // 1 - f exact; sin(pi/2 - b) = cos(b)
  }
  switch (q & 3) {
    case 0: *s_out = s; *c_out = c; break;
    case 1: *s_out = c; *c_out = -s; break;
    case 2: *s_out = -s; *c_out = -c; break;
    default: *s_out = -c; *c_out = s; break;
  }
}

// 53-bit uniform in [0, 1) from two 32-bit words (genrand_res53 layout).
inline double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t a = hi >> 5, b = lo >> 6;  // 27 + 26 bits
  return static_cast<double>(a * 67108864u + b) * (1.0 / 9007199254740992.0);
}

// Two standard normals for pair index m of stream `stream` under `seed` (Box–Muller).
// Element 2m gets z0, element 2m+1 gets z1.
inline void philox_normal_pair(uint64_t seed, uint32_t stream, uint64_t m, double* z0, double* z1) {
  const uint32_t ctr[4] = {static_cast<uint32_t>(m), static_cast<uint32_t>(m >> 32), stream, 0u};
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  const Philox4 w = philox4x32_10(ctr, key);
  const double u1 = 1.0 - uniform53(w.v[0], w.v[1]);  // (0, 1]: log never sees 0
  const double u2 = uniform53(w.v[2], w.v[3]);
  const double radius = std::sqrt(-2.0 * det_log(u1));
  double s, c;
  det_sincos_2pi(u2, &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

}  // namespace uora::kernels
