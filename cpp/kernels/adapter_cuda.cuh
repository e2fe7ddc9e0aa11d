// Multi-adapter UORA expand on the GPU (docs/design.md §4) — torch-free interface.
//
// For one input group whose shrink u = x A_cat^T is already computed (u [T, >= R]), and each module
// j of the call (id m, out columns, lambda_b offset, y offset):
//   h[t]    = lambda_d[s, m] * (with_q ? p[s] * u[t, :r] + (1 - p[s]) * u[t, r:2r] : u[t, :r])
//   z[t]    = with_q ? [p[s] * h ; (1 - p[s]) * h] : h                                  (R = 2r | r)
//   y[t, y_off + c] = round(y + lambda_b[s, lb_off + c] * sum_k B[c, k] z[t, k])    c < out
// with s = slot[t]; rows whose slot is outside [0, S) (-1 = base model only) are neither read nor
// written. Every launcher is asynchronous on `stream`, allocates nothing and reads nothing back to
// the host, so all of them can be captured in a CUDA graph.
//
// Two routes, chosen by the glue on (T, R) (shapes, never data):
//   expand_fused_cuda  one kernel: the mix above in its prologue (per 16-token tile), bf16/fp16
//                      tensor-core MMA over K = R, lambda_b and the accumulate into y in its
//                      epilogue. Built for decode (T small), where B_cat is read once per tile of
//                      output columns and the launch count is what matters.
//   group_mix_cuda + GEMM (cuBLAS, in the glue) + expand_epilogue_cuda: z is mixed once into a
//                      buffer [T, modules, R], v_j = z_j B_cat[:out_j, :R]^T by the vendor GEMM,
//                      then lambda_b and the accumulate. For prefill, where the GEMM's FLOPs
//                      dominate and z must not be recomputed once per tile of output columns.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace uora::kernels {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxExpandModules = 8;  // modules per launch; the glue splits longer lists

struct ExpandModule {
  int32_t module = 0;     // row of lambda_d's module axis
  int32_t out = 0;        // output columns (rows of b_cat used)
  int64_t lb_offset = 0;  // first column of this module's vector in lambda_b
  int64_t y_offset = 0;   // first column in y
};

struct ExpandParams {
  void* y = nullptr;  // [T, ldy], unit column stride
  int64_t ldy = 0;
  DType y_dtype = DType::kBFloat16;
  const void* u = nullptr;  // [T, ldu] shrink output, columns [0, R) used
  int64_t ldu = 0;
  DType u_dtype = DType::kBFloat16;
  const void* b = nullptr;  // b_cat [max_out, ldb]: columns [B0 | QB] (only B0 when !with_q)
  int64_t ldb = 0;
  DType b_dtype = DType::kBFloat16;
  const float* lambda_d = nullptr;  // [S, M, r]
  const float* lambda_b = nullptr;  // [S, nb]
  int64_t nb = 0;
  const float* p = nullptr;        // [S, r]; read only when with_q
  const int32_t* slot = nullptr;   // [T] at slot_stride
  int64_t slot_stride = 1;
  int64_t rows = 0, r = 0, slots = 0, modules_total = 0;  // T, r, S, M
  bool with_q = false;
  int32_t n_modules = 0;
  ExpandModule mod[kMaxExpandModules];
  // Launch with programmatic dependent launch (sm_90): the kernel may be scheduled while the
  // previous kernel on the stream (the base GEMM) drains; it waits (griddepcontrol.wait) before
  // its first global read, so this changes timing only, never results.
  bool pdl = false;
};

// Fused route. y_dtype must be bf16 or fp16; u_dtype and b_dtype are fp32 or y_dtype.
cudaError_t expand_fused_cuda(const ExpandParams& params, cudaStream_t stream);

// z [T, n_modules, R] of z_dtype (= y_dtype; fp32 allowed): z[t, j] as above, for valid rows only
// (other rows are left as they are: each output row of the GEMM depends on its own z row only).
cudaError_t group_mix_cuda(const ExpandParams& params, void* z, DType z_dtype,
                           cudaStream_t stream);

// y[t, y_off_j + c] = round(y + lambda_b[s, lb_off_j + c] * v_j[t, c]) for valid rows;
// v_j [T, out_j] contiguous, of v_dtype.
cudaError_t expand_epilogue_cuda(const ExpandParams& params, const void* const* v, DType v_dtype,
                                 cudaStream_t stream);

}  // namespace uora::kernels
