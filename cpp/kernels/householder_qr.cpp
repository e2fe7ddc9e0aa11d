#include "kernels/householder_qr.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

namespace uora::kernels {
namespace {

constexpr int64_t kNb = kQrPanel;
constexpr int64_t kRowBlock = 256;  // rows of V kept hot in cache during a block update

// Runs fn(begin, end) over [0, count) split into `threads` contiguous ranges.
template <typename Fn>
void parallel_ranges(int64_t count, int threads, Fn fn) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, count / 8));
  if (t <= 1) {
    fn(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (count + t - 1) / t;
  for (int64_t b = chunk; b < count; b += chunk) {
    pool.emplace_back([=] { fn(b, std::min(count, b + chunk)); });
  }
  fn(int64_t{0}, std::min(count, chunk));
  for (auto& th : pool) th.join();
}

// Hot loops get AVX-512 / AVX2 clones picked at load time. The clones only widen independent lanes
// (no FMA: "avx2" and "avx512f" do not enable it, and -ffp-contract=off forbids contraction), so
// every clone rounds exactly like the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UORA_SIMD_CLONES
#endif

constexpr int64_t kLanes = 8;

// Dot product in a fixed lane order: lane l sums a[i] b[i] for i = l (mod 8) over the first
// 8*floor(len/8) elements, in increasing i; lanes combine as ((0+1)+(2+3))+((4+5)+(6+7)); the
// remaining elements are added in order.
UORA_SIMD_CLONES double dot_lanes(const double* a, const double* b, int64_t len) {
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = lane[l] + a[i + l] * b[i + l];
  double s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (int64_t i = full; i < len; ++i) s = s + a[i] * b[i];
  return s;
}

// y[i] -= x[i] * s
UORA_SIMD_CLONES void axpy_sub(double* y, const double* x, double s, int64_t len) {
  for (int64_t i = 0; i < len; ++i) y[i] = y[i] - x[i] * s;
}

// w[p] += v[p] * c for p < nb (one row of V^T C)
UORA_SIMD_CLONES void row_accumulate(const double* __restrict vr, const double* __restrict c,
                                     double* __restrict w, int64_t rows, int64_t nb) {
  for (int64_t i = 0; i < rows; ++i) {
    const double ci = c[i];
    const double* vrow = vr + i * nb;
    for (int64_t p = 0; p < nb; ++p) w[p] = w[p] + vrow[p] * ci;
  }
}

// c[i] -= sum_p v[p][i] w[p], the sum over p in increasing order (v column-major, stride ldv)
UORA_SIMD_CLONES void subtract_vw(const double* __restrict v, int64_t ldv,
                                  const double* __restrict w, double* __restrict acc,
                                  double* __restrict c, int64_t len, int64_t nb) {
  for (int64_t i = 0; i < len; ++i) acc[i] = v[i] * w[0];
  for (int64_t p = 1; p < nb; ++p) {
    const double* vp = v + p * ldv;
    const double wp = w[p];
    for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + vp[i] * wp;
  }
  for (int64_t i = 0; i < len; ++i) c[i] = c[i] - acc[i];
}

// Builds the reflector for x (length m, pivot x[0]): on return x[1:] = v[1:] (v[0] = 1 implied).
// H = I - tau v v^T maps x to beta e_1.
void make_reflector(double* x, int64_t m, double* tau, double* beta) {
  const double alpha = x[0];
  const double sigma = dot_lanes(x + 1, x + 1, m - 1);
  if (sigma == 0.0) {
    *tau = 0.0;
    *beta = alpha;
    return;
  }
  const double norm = std::sqrt(alpha * alpha + sigma);
  const double b = alpha >= 0.0 ? -norm : norm;
  const double scale = 1.0 / (alpha - b);
  for (int64_t i = 1; i < m; ++i) x[i] = x[i] * scale;  // vectorizes: elementwise
  *tau = (b - alpha) / b;
  *beta = b;
}

// Unblocked factorization of the panel a (m x nb, leading dimension lda).
void factor_panel(double* a, int64_t lda, int64_t m, int64_t nb, double* tau, double* beta) {
  for (int64_t k = 0; k < nb; ++k) {
    double* col = a + k * lda + k;
    const int64_t len = m - k;
    make_reflector(col, len, &tau[k], &beta[k]);
    if (tau[k] == 0.0) continue;
    for (int64_t j = k + 1; j < nb; ++j) {
      double* cj = a + j * lda + k;
      // w = v . c with v[0] = 1
      const double w = cj[0] + dot_lanes(col + 1, cj + 1, len - 1);
      const double tw = tau[k] * w;
      cj[0] = cj[0] - tw;
      axpy_sub(cj + 1, col + 1, tw, len - 1);
    }
  }
}

// A block reflector H = I - V T V^T for one panel: V explicit (unit diagonal, zeros above), both in
// column-major (vc, m x nb) and row-major (vr, m x nb) copies, T upper triangular nb x nb.
struct BlockReflector {
  int64_t m = 0, nb = 0;
  std::vector<double> vc, vr, t;
};

void build_block(const double* a, int64_t lda, int64_t m, int64_t nb, const double* tau,
                 BlockReflector* h) {
  h->m = m;
  h->nb = nb;
  h->vc.assign(m * nb, 0.0);
  h->vr.assign(m * nb, 0.0);
  h->t.assign(nb * nb, 0.0);
  for (int64_t p = 0; p < nb; ++p) {
    double* v = h->vc.data() + p * m;
    v[p] = 1.0;
    for (int64_t i = p + 1; i < m; ++i) v[i] = a[p * lda + i];
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < nb; ++p) h->vr[i * nb + p] = h->vc[p * m + i];
  // T (forward, columnwise): T[p,p] = tau_p; T[0:p, p] = -tau_p T[0:p, 0:p] (V[:, 0:p]^T v_p).
  std::vector<double> y(nb);
  for (int64_t p = 0; p < nb; ++p) {
    const double* vp = h->vc.data() + p * m;
    for (int64_t q = 0; q < p; ++q) y[q] = dot_lanes(h->vc.data() + q * m, vp, m);
    for (int64_t q = 0; q < p; ++q) {
      double s = 0.0;
      for (int64_t u = q; u < p; ++u) s += h->t[u * nb + q] * y[u];  // T[q,u] stored at [u*nb+q]
      h->t[p * nb + q] = -tau[p] * s;
    }
    h->t[p * nb + p] = tau[p];
  }
}

// c (m x nc, column-major, leading dimension ldc) <- H c  (transpose_t = false: H = I - V T V^T)
//                                                or H^T c (transpose_t = true:  I - V T^T V^T).
void apply_block(const BlockReflector& h, bool transpose_t, double* c, int64_t ldc, int64_t nc,
                 int threads) {
  const int64_t m = h.m, nb = h.nb;
  parallel_ranges(nc, threads, [&](int64_t j0, int64_t j1) {
    std::vector<double> w((j1 - j0) * nb, 0.0);
    // w[:, j] = V^T c[:, j]: each w[p, j] sums over rows i in increasing order, row blocks in order.
    for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
      const int64_t i1 = std::min(m, i0 + kRowBlock);
      for (int64_t j = j0; j < j1; ++j)
        row_accumulate(h.vr.data() + i0 * nb, c + j * ldc + i0, w.data() + (j - j0) * nb, i1 - i0,
                       nb);
    }
    // w <- T w or T^T w, each output summing over q in increasing order.
    std::vector<double> tw(nb);
    for (int64_t j = j0; j < j1; ++j) {
      double* wj = w.data() + (j - j0) * nb;
      for (int64_t p = 0; p < nb; ++p) {
        double s = 0.0;
        if (transpose_t) {
          for (int64_t q = 0; q <= p; ++q) s += h.t[p * nb + q] * wj[q];  // T[q,p]
        } else {
          for (int64_t q = p; q < nb; ++q) s += h.t[q * nb + p] * wj[q];  // T[p,q]
        }
        tw[p] = s;
      }
      std::memcpy(wj, tw.data(), nb * sizeof(double));
    }
    // c[:, j] -= V w[:, j]: each row's correction sums over p in increasing order.
    std::vector<double> acc(kRowBlock);
    for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
      const int64_t i1 = std::min(m, i0 + kRowBlock), len = i1 - i0;
      for (int64_t j = j0; j < j1; ++j)
        subtract_vw(h.vc.data() + i0, m, w.data() + (j - j0) * nb, acc.data(), c + j * ldc + i0,
                    len, nb);
    }
  });
}

}  // namespace

int householder_thin_q(double* g, int64_t n, int64_t r, int threads) {
  if (r < 1 || n < r) return -1;
  std::vector<double> tau(r), beta(r);
  std::vector<BlockReflector> blocks;
  // Factorization: panel by panel, then update the trailing columns with H^T.
  for (int64_t k0 = 0; k0 < r; k0 += kNb) {
    const int64_t nb = std::min(kNb, r - k0), m = n - k0;
    double* panel = g + k0 * n + k0;
    factor_panel(panel, n, m, nb, tau.data() + k0, beta.data() + k0);
    blocks.emplace_back();
    build_block(panel, n, m, nb, tau.data() + k0, &blocks.back());
    const int64_t nc = r - k0 - nb;
    if (nc > 0) apply_block(blocks.back(), /*transpose_t=*/true, panel + nb * n, n, nc, threads);
  }
  // Q = H_0 H_1 ... applied to the first r columns of the identity, last panel first.
  std::fill(g, g + n * r, 0.0);
  for (int64_t j = 0; j < r; ++j) g[j * n + j] = 1.0;
  for (int64_t b = static_cast<int64_t>(blocks.size()) - 1; b >= 0; --b) {
    const int64_t k0 = b * kNb;
    apply_block(blocks[b], /*transpose_t=*/false, g + k0 * n + k0, n, r - k0, threads);
  }
  // diag(R) > 0: flip the columns whose R_kk came out negative.
  for (int64_t k = 0; k < r; ++k) {
    if (beta[k] < 0.0) {
      double* qk = g + k * n;
      for (int64_t i = 0; i < n; ++i) qk[i] = -qk[i];
    }
  }
  return 0;
}

}  // namespace uora::kernels
