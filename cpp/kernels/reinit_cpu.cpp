#include "kernels/reinit.h"

namespace uora::kernels {

void reinit_cpu(const ReinitParams& q) {
  // Pass 1: counters, fires and the record, per index.
  bool any = false;
  for (int64_t i = 0; i < q.r; ++i) any = reinit_index(q, i) > 0 || any;
  if (!any) return;
  // Pass 2: rewrite the fired rows of A and columns of B, sweeping memory in order (B's columns
  // are strided, so B goes row by row with a per-column test).
  for (int64_t i = 0; i < q.r; ++i) {
    if (q.fires[i] == 0) continue;
    for (int64_t j = 0; j < q.max_in; ++j) {
      const int64_t e = i * q.max_in + j;
      q.a[e] = mix_value(q.p[i], q.a0[e], q.qa[e]);
    }
  }
  for (int64_t j = 0; j < q.max_out; ++j)
    for (int64_t i = 0; i < q.r; ++i) {
      if (q.fires[i] == 0) continue;
      const int64_t e = j * q.r + i;
      q.b[e] = mix_value(q.p[i], q.b0[e], q.qb[e]);
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
