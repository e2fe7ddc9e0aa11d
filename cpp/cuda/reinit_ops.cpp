// CUDA reinit_ and mix_projections: shared checks -> params -> kernels/reinit_cuda.cu, on the
// current stream under a device guard. The fires vector is the only allocation (size r, fixed), and
// nothing is read back to the host, so a training step that calls reinit_ can be graph-captured.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "bindings/checks.h"
#include "kernels/reinit_cuda.cuh"

namespace uora {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "uora (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor reinit_cuda(const at::Tensor& lambda_d, at::Tensor& counts, at::Tensor& p, at::Tensor& a,
                       at::Tensor& b, const at::Tensor& a0, const at::Tensor& qa,
                       const at::Tensor& b0, const at::Tensor& qb, double tau, int64_t k,
                       double alpha) {
  const c10::cuda::CUDAGuard guard(lambda_d.device());
  auto fires = at::empty({lambda_d.size(-1)}, lambda_d.options().dtype(at::kInt));
  const auto params = reinit_params(lambda_d, counts, p, a, b, a0, qa, b0, qb, tau, k, alpha, fires);
  check_launch(kernels::reinit_cuda(params, c10::cuda::getCurrentCUDAStream()), "reinit_cuda");
  return fires;
}

std::tuple<at::Tensor, at::Tensor> mix_projections_cuda(const at::Tensor& a0, const at::Tensor& qa,
                                                        const at::Tensor& b0, const at::Tensor& qb,
                                                        const at::Tensor& p) {
  const c10::cuda::CUDAGuard guard(a0.device());
  auto a = at::empty_like(a0);
  auto b = at::empty_like(b0);
  const auto params = mix_params(a0, qa, b0, qb, p, a, b);
  check_launch(kernels::mix_projections_cuda(params, c10::cuda::getCurrentCUDAStream()),
               "mix_projections_cuda");
  return {a, b};
}

}  // namespace
}  // namespace uora

// projection_factor has no CUDA kernel by design: projections are built once per family on the CPU
// (bit-exact generator, docs/design.md §2) and uploaded; the op takes no tensor, so it dispatches to CPU.
TORCH_LIBRARY_IMPL(uora, CUDA, m) {
  m.impl("reinit_", &uora::reinit_cuda);
  m.impl("mix_projections", &uora::mix_projections_cuda);
}
