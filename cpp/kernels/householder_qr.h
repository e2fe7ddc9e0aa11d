// Thin Householder QR in float64 with a fixed operation order (docs/design.md §2).
//
// Every floating-point sum here runs in an order fixed by this code alone: vectorization is only
// across independent outputs (each output keeps its own sequential sum), threads split independent
// columns, and the file is compiled without FMA contraction. So the result bits do not depend on
// the machine, the SIMD width or the thread count.
#pragma once
#include <cstdint>

namespace uora::kernels {

// Panel width of the blocked algorithm. Part of the bit-exact specification: changing it changes
// the rounding, which needs a new projection algorithm id.
constexpr int64_t kQrPanel = 32;

// In: g, an n x r matrix (n >= r >= 1) stored column-major (column j at g + j*n).
// Out: g holds Q (n x r, orthonormal columns) of g = Q R with diag(R) > 0 (the Haar convention:
// for Gaussian g, Q is uniformly distributed on the Stiefel manifold).
// threads: how many threads may split the trailing updates (results are identical for any value).
// Returns 0, or a negative error code on bad sizes.
int householder_thin_q(double* g, int64_t n, int64_t r, int threads);

}  // namespace uora::kernels
