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

// Sequential dot product: the order is i = 0, 1, 2, ... (the panel is narrow; this is not hot).
double dot_seq(const double* a, const double* b, int64_t len) {
  double s = 0.0;
  for (int64_t i = 0; i < len; ++i) s += a[i] * b[i];
  return s;
}

// Builds the reflector for x (length m, pivot x[0]): on return x[1:] = v[1:] (v[0] = 1 implied).
// H = I - tau v v^T maps x to beta e_1.
void make_reflector(double* x, int64_t m, double* tau, double* beta) {
  const double alpha = x[0];
  const double sigma = dot_seq(x + 1, x + 1, m - 1);
  if (sigma == 0.0) {
    *tau = 0.0;
    *beta = alpha;
    return;
  }
  const double norm = std::sqrt(alpha * alpha + sigma);
  const double b = alpha >= 0.0 ? -norm : norm;
  const double scale = 1.0 / (alpha - b);
  for (int64_t i = 1; i < m; ++i) x[i] = x[i] * scale;
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
      const double w = cj[0] + dot_seq(col + 1, cj + 1, len - 1);
      const double tw = tau[k] * w;
      cj[0] = cj[0] - tw;
      for (int64_t i = 1; i < len; ++i) cj[i] = cj[i] - col[i] * tw;
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
    for (int64_t q = 0; q < p; ++q) y[q] = dot_seq(h->vc.data() + q * m, vp, m);
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
      for (int64_t j = j0; j < j1; ++j) {
        double* wj = w.data() + (j - j0) * nb;
        const double* cj = c + j * ldc;
        for (int64_t i = i0; i < i1; ++i) {
          const double ci = cj[i];
          const double* vrow = h.vr.data() + i * nb;
          for (int64_t p = 0; p < nb; ++p) wj[p] = wj[p] + vrow[p] * ci;
        }
      }
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
      for (int64_t j = j0; j < j1; ++j) {
        const double* wj = w.data() + (j - j0) * nb;
        double* cj = c + j * ldc + i0;
        const double* v0 = h.vc.data() + i0;
        for (int64_t i = 0; i < len; ++i) acc[i] = v0[i] * wj[0];
        for (int64_t p = 1; p < nb; ++p) {
          const double* vp = h.vc.data() + p * m + i0;
          const double wp = wj[p];
          for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + vp[i] * wp;
        }
        for (int64_t i = 0; i < len; ++i) cj[i] = cj[i] - acc[i];
      }
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
