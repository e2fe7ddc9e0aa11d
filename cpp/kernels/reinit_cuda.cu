// Reinit and projection rebuild kernels (interface: reinit_cuda.cuh). mix_value and reinit_decay
// use __fmul_rn/__fadd_rn on the device, so no FMA contraction can change a bit against the CPU.
#include <algorithm>

#include "kernels/reinit_cuda.cuh"

namespace uora::kernels {
namespace {

constexpr int kThreads = 256;

// One thread per index i: the layers are walked in order, as on the CPU, so the counters and the
// number of fires are the CPU's; p decays once per fire, in float32.
__global__ void __launch_bounds__(kThreads) reinit_count_kernel(ReinitParams q) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < q.r) reinit_index(q, i);
}

// Element-wise over A [r, max_in] then B [max_out, r]; rows/columns that did not fire are left
// untouched (all = true rewrites everything: mix_projections).
template <bool kAll>
__global__ void __launch_bounds__(kThreads)
    mix_kernel(const float* p, const int32_t* fires, const float* a0, const float* qa, float* a,
               const float* b0, const float* qb, float* b, int64_t r, int64_t max_in,
               int64_t max_out) {
  const int64_t na = r * max_in, total = na + max_out * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += stride) {
    if (e < na) {
      const int64_t i = e / max_in;
      if (kAll || fires[i] > 0) a[e] = mix_value(p[i], a0[e], qa[e]);
    } else {
      const int64_t eb = e - na, i = eb % r;
      if (kAll || fires[i] > 0) b[eb] = mix_value(p[i], b0[eb], qb[eb]);
    }
  }
}

unsigned mix_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 132 * 16));
}

}  // namespace

cudaError_t reinit_cuda(const ReinitParams& q, cudaStream_t stream) {
  if (q.r == 0) return cudaSuccess;
  reinit_count_kernel<<<static_cast<unsigned>((q.r + kThreads - 1) / kThreads), kThreads, 0,
                        stream>>>(q);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t total = q.r * (q.max_in + q.max_out);
  if (total == 0) return cudaSuccess;
  mix_kernel<false><<<mix_blocks(total), kThreads, 0, stream>>>(
      q.p, q.fires, q.a0, q.qa, q.a, q.b0, q.qb, q.b, q.r, q.max_in, q.max_out);
  return cudaGetLastError();
}

cudaError_t mix_projections_cuda(const MixParams& q, cudaStream_t stream) {
  const int64_t total = q.r * (q.max_in + q.max_out);
  if (total == 0) return cudaSuccess;
  mix_kernel<true><<<mix_blocks(total), kThreads, 0, stream>>>(
      q.p, nullptr, q.a0, q.qa, q.a, q.b0, q.qb, q.b, q.r, q.max_in, q.max_out);
  return cudaGetLastError();
}

}  // namespace uora::kernels
