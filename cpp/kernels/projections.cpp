#include "kernels/projections.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "kernels/det_math.h"
#include "kernels/householder_qr.h"

namespace uora::kernels {

void fill_gaussian(uint64_t seed, uint32_t stream, int64_t n, int64_t r, double* g, int threads) {
  const int64_t total = n * r, pairs = (total + 1) / 2;
  auto work = [=](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      double z[2];
      philox_normal_pair(seed, stream, static_cast<uint64_t>(m), &z[0], &z[1]);
      for (int h = 0; h < 2; ++h) {
        const int64_t e = 2 * m + h;  // logical row-major index into the n x r matrix
        if (e < total) g[(e % r) * n + e / r] = z[h];
      }
    }
  };
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, pairs / 4096));
  std::vector<std::thread> pool;
  const int64_t chunk = (pairs + t - 1) / t;
  for (int64_t b = chunk; b < pairs; b += chunk) pool.emplace_back(work, b, std::min(pairs, b + chunk));
  work(0, std::min(pairs, chunk));
  for (auto& th : pool) th.join();
}

int build_orthonormal(uint64_t seed, uint32_t stream, int64_t n, int64_t r, bool transposed,
                      float* out, int threads) {
  if (r < 1 || n < r) return -1;
  std::vector<double> g(static_cast<size_t>(n * r));
  fill_gaussian(seed, stream, n, r, g.data(), threads);
  const int rc = householder_thin_q(g.data(), n, r, threads);
  if (rc != 0) return rc;
  if (transposed) {  // out[k, i] = Q[i, k]: column k of Q is contiguous
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < n; ++i) out[k * n + i] = static_cast<float>(g[k * n + i]);
  } else {  // out[i, k] = Q[i, k]
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < r; ++k) out[i * r + k] = static_cast<float>(g[k * n + i]);
  }
  return 0;
}

}  // namespace uora::kernels
