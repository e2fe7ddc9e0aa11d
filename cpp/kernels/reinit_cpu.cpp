#include "kernels/reinit.h"

namespace uora::kernels {

namespace {
void mix_row_and_column(int64_t i, float pi, const float* a0, const float* qa, float* a,
                        int64_t max_in, const float* b0, const float* qb, float* b,
                        int64_t max_out, int64_t r) {
  for (int64_t j = 0; j < max_in; ++j) {
    const int64_t e = i * max_in + j;
    a[e] = mix_value(pi, a0[e], qa[e]);
  }
  for (int64_t j = 0; j < max_out; ++j) {
    const int64_t e = j * r + i;
    b[e] = mix_value(pi, b0[e], qb[e]);
  }
}
}  // namespace

void reinit_cpu(const ReinitParams& q) {
  for (int64_t i = 0; i < q.r; ++i) {
    int32_t fires = 0;
    for (int64_t l = 0; l < q.layers; ++l) {
      const float v = q.lambda_d[l * q.r + i];
      if (v < q.tau && -v < q.tau) {  // |v| < tau; false for NaN
        const int32_t c = ++q.counts[l * q.r + i];
        if (c % q.k == 0) ++fires;
      }
    }
    q.fires[i] = fires;
    if (fires == 0) continue;
    float pi = q.p[i];
    for (int32_t f = 0; f < fires; ++f) pi = reinit_decay(pi, q.alpha);
    q.p[i] = pi;
    mix_row_and_column(i, pi, q.a0, q.qa, q.a, q.max_in, q.b0, q.qb, q.b, q.max_out, q.r);
  }
}

void mix_projections_cpu(const MixParams& q) {
  // Row-major sweeps (B's columns are strided); same per-element formula as reinit_cpu.
  for (int64_t i = 0; i < q.r; ++i)
    for (int64_t j = 0; j < q.max_in; ++j) {
      const int64_t e = i * q.max_in + j;
      q.a[e] = mix_value(q.p[i], q.a0[e], q.qa[e]);
    }
  for (int64_t j = 0; j < q.max_out; ++j)
    for (int64_t i = 0; i < q.r; ++i) {
      const int64_t e = j * q.r + i;
      q.b[e] = mix_value(q.p[i], q.b0[e], q.qb[e]);
    }
}

}  // namespace uora::kernels
