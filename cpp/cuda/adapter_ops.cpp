// CUDA multi-adapter UORA group op (docs/design.md §4): shared checks -> ExpandParams -> the kernels of
// kernels/adapter_cuda.cu, on the current stream under a device guard. No host synchronization
// and no allocation whose size depends on data, so every path can be captured in a CUDA graph.
//
// Route by shapes (T, R), never by data: small T * R and a 16-bit y, one fused kernel (decode);
// otherwise z is mixed once into a buffer and the expand GEMM runs in cuBLAS, followed by the
// lambda_b/accumulate epilogue (3 kernels + one GEMM per module). UORA_EXPAND_IMPL=fused|gemm forces a route (benchmarks);
// UORA_PDL=0 turns off programmatic dependent launch of the fused kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bindings/checks.h"
#include "kernels/adapter_cuda.cuh"

namespace uora {
namespace {

// Measured on an H200 (bench/kernels/NOTES.md): the fused kernel's time grows with R (its B tile)
// and with the rows it mixes (every block of 32 output columns mixes z again); the GEMM route costs
// ~8 us flat at decode sizes. The fused kernel won at T = 1 with R <= 512 and lost at T = 16 for
// every R and at R = 2048 already at T = 1; the crossover in between is interpolated (T*R ~ 1.2k).
constexpr int64_t kFusedMaxR = 512;
constexpr int64_t kFusedMaxWork = 1024;  // rows * R

kernels::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    case at::kHalf: return kernels::DType::kFloat16;
    default: TORCH_CHECK(false, "uora (CUDA): unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "uora (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

bool use_gemm_route(const at::Tensor& y, int64_t rows, int64_t R) {
  if (y.scalar_type() == at::kFloat) return true;  // the fused kernel is bf16/fp16 MMA only
  const char* impl = std::getenv("UORA_EXPAND_IMPL");
  if (impl != nullptr && std::strcmp(impl, "fused") == 0) return false;
  if (impl != nullptr && std::strcmp(impl, "gemm") == 0) return true;
  return R > kFusedMaxR || rows * R > kFusedMaxWork;
}

// The expand of one group from u (any row stride, unit column stride); modules in chunks of 8.
void expand(at::Tensor& y, const at::Tensor& u, const at::Tensor& b_cat_in,
            const at::Tensor& lambda_d, const at::Tensor& lambda_b, const at::Tensor& p,
            const at::Tensor& slot, at::IntArrayRef modules, at::IntArrayRef lambda_b_offsets,
            at::IntArrayRef y_offsets, at::IntArrayRef outs, const GroupShape& g, bool with_q) {
  const auto b_cat = b_cat_in.stride(1) == 1 ? b_cat_in : b_cat_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::ExpandParams a;
  a.y = y.data_ptr();
  a.ldy = y.stride(0);
  a.y_dtype = kernel_dtype(y);
  a.u = u.data_ptr();
  a.ldu = u.stride(0);
  a.u_dtype = kernel_dtype(u);
  a.b = b_cat.data_ptr();
  a.ldb = b_cat.stride(0);
  a.b_dtype = kernel_dtype(b_cat);
  a.lambda_d = lambda_d.data_ptr<float>();
  a.lambda_b = lambda_b.data_ptr<float>();
  a.nb = g.nb;
  a.p = with_q ? p.data_ptr<float>() : nullptr;
  a.slot = slot.data_ptr<int32_t>();
  a.slot_stride = slot.stride(0);
  a.rows = g.rows;
  a.r = g.r;
  a.slots = g.slots;
  a.modules_total = g.modules;
  a.with_q = with_q;
  const char* pdl = std::getenv("UORA_PDL");
  a.pdl = !(pdl != nullptr && std::strcmp(pdl, "0") == 0);
  const bool gemm = use_gemm_route(y, g.rows, g.R);
  // The GEMM route multiplies in y's dtype; a float32 b_cat is converted once per call.
  at::Tensor b_mm;
  if (gemm) {
    b_mm = b_cat.scalar_type() == y.scalar_type() ? b_cat
                                                  : b_cat.narrow(1, 0, g.R).to(y.scalar_type());
  }
  for (size_t j0 = 0; j0 < modules.size(); j0 += kernels::kMaxExpandModules) {
    const size_t n = std::min<size_t>(kernels::kMaxExpandModules, modules.size() - j0);
    a.n_modules = static_cast<int32_t>(n);
    for (size_t j = 0; j < n; ++j) {
      a.mod[j].module = static_cast<int32_t>(modules[j0 + j]);
      a.mod[j].out = static_cast<int32_t>(outs[j0 + j]);
      a.mod[j].lb_offset = lambda_b_offsets[j0 + j];
      a.mod[j].y_offset = y_offsets[j0 + j];
    }
    if (!gemm) {
      check_launch(kernels::expand_fused_cuda(a, stream), "expand_fused_cuda");
      continue;
    }
    // z [T, n, R]: rows with no adapter are never written nor read back into y.
    auto z = at::empty({g.rows, static_cast<int64_t>(n), g.R}, y.options());
    check_launch(kernels::group_mix_cuda(a, z.data_ptr(), kernel_dtype(z), stream),
                 "group_mix_cuda");
    std::vector<at::Tensor> v(n);
    const void* vp[kernels::kMaxExpandModules] = {};
    for (size_t j = 0; j < n; ++j) {
      const auto bj = b_mm.narrow(0, 0, outs[j0 + j]).narrow(1, 0, g.R);  // [out_j, R]
      v[j] = at::mm(z.select(1, static_cast<int64_t>(j)), bj.t()).contiguous();  // [T, out_j]
      vp[j] = v[j].data_ptr();
    }
    check_launch(kernels::expand_epilogue_cuda(a, vp, kernel_dtype(v[0]), stream),
                 "expand_epilogue_cuda");
  }
}

void uora_expand_cuda(at::Tensor& y, const at::Tensor& u, const at::Tensor& b_cat,
                      const at::Tensor& lambda_d, const at::Tensor& lambda_b, const at::Tensor& p,
                      const at::Tensor& slot, at::IntArrayRef modules,
                      at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                      at::IntArrayRef outs, bool with_q) {
  const GroupShape g = check_expand_args(y, u, b_cat, lambda_d, lambda_b, p, slot, modules,
                                         lambda_b_offsets, y_offsets, outs, with_q);
  const c10::cuda::CUDAGuard guard(y.device());
  if (g.rows == 0 || modules.empty()) return;
  expand(y, u, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets, outs, g,
         with_q);
}

void uora_group_cuda(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_cat,
                     const at::Tensor& b_cat, const at::Tensor& lambda_d,
                     const at::Tensor& lambda_b, const at::Tensor& p, const at::Tensor& slot,
                     at::IntArrayRef modules, at::IntArrayRef lambda_b_offsets,
                     at::IntArrayRef y_offsets, at::IntArrayRef outs, bool with_q) {
  const GroupShape g = check_group_args(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules,
                                        lambda_b_offsets, y_offsets, outs, with_q);
  const c10::cuda::CUDAGuard guard(y.device());
  if (g.rows == 0 || modules.empty()) return;
  // The shared shrink for every row of the group (cuBLAS): u [T, R] in x's dtype. Rows without an
  // adapter are computed too (no compaction on the host); the expand skips them.
  auto a = a_cat.narrow(0, 0, g.R).narrow(1, 0, g.in);
  if (a.scalar_type() != x.scalar_type()) a = a.to(x.scalar_type());
  const auto u = at::mm(x, a.t());
  expand(y, u, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets, outs, g,
         with_q);
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CUDA, m) {
  m.impl("uora_group_", &uora::uora_group_cuda);
  m.impl("uora_expand_", &uora::uora_expand_cuda);
}
