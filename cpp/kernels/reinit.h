// Vectorized UORA reinitialization (docs/design.md §1) — torch-free, shared by the CPU and CUDA glue.
//
//   below[l, i]  = |lambda_d[l, i]| < tau
//   counts      += below
//   fires[i]     = #{ l : below[l, i] and counts[l, i] % k == 0 }
//   p[i]         = max(p[i] * alpha, 2^-64), fires[i] times (float32, in order)
//   A[i, :]      = mix(p[i], A0[i, :], QA[i, :])   for every i with fires[i] > 0
//   B[:, i]      = mix(p[i], B0[:, i], QB[:, i])
//
// mix is evaluated exactly as below (two products, one sum, float32 round-to-nearest each, no FMA),
// so rebuilding A, B from (seed, p) gives the live training matrices bit for bit.
#pragma once
#include <cstdint>

#include "kernels/philox.h"  // UORA_HD

namespace uora::kernels {

UORA_HD float mix_value(float p, float x0, float q) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(p, x0), __fmul_rn(__fsub_rn(1.0f, p), q));
#else
  const float a = p * x0;
  const float b = (1.0f - p) * q;
  return a + b;
#endif
}

// p <- p * alpha, floored at 2^-64. Below that, p * A0 is far under the float32 resolution of A,
// so the floor changes nothing observable, while it keeps the record in (0, 1] (alpha^n would
// underflow to 0 after ~150 events) and keeps p * A0 out of denormals, which are ~100x slower
// on x86.
constexpr float kReinitFloor = 5.42101086e-20f;  // 2^-64, exact

UORA_HD float reinit_decay(float p, float alpha) {
#if defined(__CUDA_ARCH__)
  const float v = __fmul_rn(p, alpha);
#else
  const float v = p * alpha;
#endif
  return v < kReinitFloor ? kReinitFloor : v;
}

struct ReinitParams {
  const float* lambda_d = nullptr;  // [layers, r]
  int32_t* counts = nullptr;        // [layers, r]
  float* p = nullptr;               // [r]
  int32_t* fires = nullptr;         // [r], written
  float* a = nullptr;               // [r, max_in]
  const float* a0 = nullptr;
  const float* qa = nullptr;
  float* b = nullptr;               // [max_out, r]
  const float* b0 = nullptr;
  const float* qb = nullptr;
  int64_t layers = 0, r = 0, max_in = 0, max_out = 0;
  float tau = 0.0f, alpha = 0.5f;
  int32_t k = 1;
};

// The per-index step both devices run (one CPU loop iteration, one CUDA thread): walks the layers
// in order, bumps the counters, counts the fires and decays the record. Returns the fires.
UORA_HD int32_t reinit_index(const ReinitParams& q, int64_t i) {
  int32_t fires = 0;
  for (int64_t l = 0; l < q.layers; ++l) {
    const float v = q.lambda_d[l * q.r + i];
    if (v < q.tau && -v < q.tau) {  // |v| < tau; false for NaN
      const int32_t c = ++q.counts[l * q.r + i];
      if (c % q.k == 0) ++fires;
    }
  }
  q.fires[i] = fires;
  float p = q.p[i];
  for (int32_t f = 0; f < fires; ++f) p = reinit_decay(p, q.alpha);
  q.p[i] = p;
  return fires;
}

// CPU implementation (reinit_cpu.cpp).
void reinit_cpu(const ReinitParams& params);

struct MixParams {
  const float* p = nullptr;  // [r]
  const float* a0 = nullptr;
  const float* qa = nullptr;
  float* a = nullptr;  // [r, max_in]
  const float* b0 = nullptr;
  const float* qb = nullptr;
  float* b = nullptr;  // [max_out, r]
  int64_t r = 0, max_in = 0, max_out = 0;
};

void mix_projections_cpu(const MixParams& params);

}  // namespace uora::kernels
