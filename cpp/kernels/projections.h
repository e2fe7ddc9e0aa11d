// The UORA projection family generator, algorithm "uora-philox-qr-v1" (docs/design.md §2).
//
//   G_s[i, j] = normal #(i*r + j) of Philox stream s under `seed`  (n x r, n = max_in or max_out)
//   Q_s       = thin Householder Q of G_s with diag(R) > 0          (float64, fixed order)
//   A0 = Q_A0^T, QA = Q_QA^T  ([r, max_in], orthonormal rows)       cast to float32
//   B0 = Q_B0,   QB = Q_QB    ([max_out, r], orthonormal columns)
#pragma once
#include <cstdint>

namespace uora::kernels {

constexpr const char* kProjectionAlgorithm = "uora-philox-qr-v1";

enum ProjectionStream : uint32_t { kStreamA0 = 0, kStreamB0 = 1, kStreamQA = 2, kStreamQB = 3 };

// Fills g (n x r, column-major) with the stream's standard normals.
void fill_gaussian(uint64_t seed, uint32_t stream, int64_t n, int64_t r, double* g, int threads);

// One orthonormal factor: out is [r, n] row-major (rows orthonormal) when transposed is true
// (A0, QA), else [n, r] row-major (columns orthonormal; B0, QB). Returns 0 or a negative error.
int build_orthonormal(uint64_t seed, uint32_t stream, int64_t n, int64_t r, bool transposed,
                      float* out, int threads);

}  // namespace uora::kernels
