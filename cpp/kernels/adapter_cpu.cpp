#include "kernels/adapter_cpu.h"

namespace uora::kernels {

void group_mix_cpu(const GroupMixParams& q) {
  const bool with_q = q.R != q.r;
  for (int64_t t = 0; t < q.rows; ++t) {
    const int64_t s = q.slot[t];
    const float* u = q.u + t * q.R;
    const float* ld = q.lambda_d + (s * q.modules + q.module) * q.r;
    float* z = q.z + t * q.R;
    if (!with_q) {
      for (int64_t i = 0; i < q.r; ++i) z[i] = ld[i] * u[i];
      continue;
    }
    const float* p = q.p + s * q.r;
    for (int64_t i = 0; i < q.r; ++i) {
      const float h = ld[i] * (p[i] * u[i] + (1.0f - p[i]) * u[q.r + i]);
      z[i] = p[i] * h;
      z[q.r + i] = (1.0f - p[i]) * h;
    }
  }
}

void expand_accumulate_cpu(const ExpandParams& q) {
  for (int64_t t = 0; t < q.rows; ++t) {
    const float* lb = q.lambda_b + q.slot[t] * q.nb + q.offset;
    const float* v = q.v + t * q.out;
    float* y = q.y + q.row_index[t] * q.ldy + q.col0;
    for (int64_t c = 0; c < q.out; ++c) y[c] += lb[c] * v[c];
  }
}

}  // namespace uora::kernels
