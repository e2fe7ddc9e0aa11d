// Multi-adapter UORA linear, CPU element-wise stages (docs/design.md §4) — torch-free.
//
// For the rows t of one input group that carry an adapter (slot s_t >= 0), with u_t = A_cat x_t
// (R = r without Q halves, 2r with them) already computed by a GEMM:
//   h_t = lambda_d[s_t, m] * (R == r ? u_t : p[s_t] * u_t[:r] + (1 - p[s_t]) * u_t[r:])
//   z_t = R == r ? h_t : [p[s_t] * h_t ; (1 - p[s_t]) * h_t]                  (group_mix)
// then v_t = B_cat[:out_m] z_t by a GEMM, and
//   y[row_t, col0 + c] += lambda_b[s_t, off_m + c] * v_t[c]                     (expand_accumulate)
#pragma once
#include <cstdint>

namespace uora::kernels {

struct GroupMixParams {
  const float* u = nullptr;        // [rows, R]
  const float* lambda_d = nullptr;  // [slots, modules, r]
  const float* p = nullptr;        // [slots, r]; unused when R == r
  const int32_t* slot = nullptr;   // [rows], each >= 0
  float* z = nullptr;              // [rows, R]
  int64_t rows = 0, r = 0, R = 0, modules = 0, module = 0;
};

void group_mix_cpu(const GroupMixParams& q);

struct ExpandParams {
  const float* v = nullptr;         // [rows, out]
  const float* lambda_b = nullptr;  // [slots, nb] packed per module
  const int32_t* slot = nullptr;    // [rows]
  const int64_t* row_index = nullptr;  // [rows] destination row in y
  float* y = nullptr;               // [*, ldy]
  int64_t rows = 0, out = 0, nb = 0, offset = 0, col0 = 0, ldy = 0;
};

void expand_accumulate_cpu(const ExpandParams& q);

}  // namespace uora::kernels
