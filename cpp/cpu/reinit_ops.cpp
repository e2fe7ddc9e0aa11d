#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "bindings/checks.h"
#include "kernels/reinit.h"

namespace uora {
namespace {

at::Tensor reinit_cpu(const at::Tensor& lambda_d, at::Tensor& counts, at::Tensor& p, at::Tensor& a,
                      at::Tensor& b, const at::Tensor& a0, const at::Tensor& qa,
                      const at::Tensor& b0, const at::Tensor& qb, double tau, int64_t k,
                      double alpha) {
  auto fires = at::empty({lambda_d.size(-1)}, lambda_d.options().dtype(at::kInt));
  kernels::reinit_cpu(reinit_params(lambda_d, counts, p, a, b, a0, qa, b0, qb, tau, k, alpha, fires));
  return fires;
}

std::tuple<at::Tensor, at::Tensor> mix_projections_cpu(const at::Tensor& a0, const at::Tensor& qa,
                                                       const at::Tensor& b0, const at::Tensor& qb,
                                                       const at::Tensor& p) {
  auto a = at::empty_like(a0);
  auto b = at::empty_like(b0);
  kernels::mix_projections_cpu(mix_params(a0, qa, b0, qb, p, a, b));
  return {a, b};
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CPU, m) {
  m.impl("reinit_", &uora::reinit_cpu);
  m.impl("mix_projections", &uora::mix_projections_cpu);
}
