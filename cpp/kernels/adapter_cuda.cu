// Multi-adapter UORA expand kernels (interface and math: adapter_cuda.cuh).
#include <algorithm>

#include "kernels/adapter_cuda.cuh"
#include "kernels/cuda_common.cuh"

namespace uora::kernels {
namespace {

using dev::from_f;
using dev::to_f;

// ---- fused route -------------------------------------------------------------------------------
// One block: 16 tokens x 32 output columns of one module; 4 warps, each one m16n8 MMA tile.
// Decode reads B_cat once per 32 columns, so the whole K extent of the block's B tile is loaded
// at once (all copies in flight together: the kernel is latency-bound, not FLOP-bound) while the
// prologue mixes z for the 16 tokens. K = R is walked in phases of at most kKMax when r is large.
constexpr int kBM = 16;
constexpr int kBN = 32;
constexpr int kThreads = 128;
constexpr int kKMax = 2048;  // K elements per phase: (16 + 32) x 2056 x 2 B = 197 KB of smem
constexpr int kPad = 8;      // row padding (16 B): ldmatrix rows hit distinct bank groups

inline int round_up(int64_t v, int m) { return static_cast<int>((v + m - 1) / m * m); }

// Loads are issued kBatch at a time per thread before any is used: the prologue is latency-bound
// (gathers from L2), so independent loads in flight, not bandwidth, set its time.
constexpr int kBatch = 8;

// B[c0 + c, h * r + i0 + ii] -> bs[c][h * ip + ii] as TY, zeros outside [0, out) x [0, r).
template <typename TY, typename TB>
__device__ void load_b_tile(const ExpandParams& a, const ExpandModule& md, TY* bs, int ld, int c0,
                            int64_t i0, int ip, int kp, bool vec) {
  const TB* b = static_cast<const TB*>(a.b);
  if (vec) {  // r and ldb are multiples of the vector width, b is 16-byte aligned
    constexpr int kVW = 16 / sizeof(TB);
    const int per_row = kp / kVW, total = kBN * per_row;
    auto src_of = [&](int q, bool& ok) {
      const int c = q / per_row, kk = (q % per_row) * kVW;
      const int h = kk / ip;
      const int64_t i = i0 + (kk - h * ip);
      ok = q < total && c0 + c < md.out && i < a.r;
      return ok ? b + static_cast<int64_t>(c0 + c) * a.ldb + h * a.r + i : b;
    };
    auto dst_of = [&](int q) { return bs + (q / per_row) * ld + (q % per_row) * kVW; };
    if constexpr (std::is_same_v<TB, TY>) {  // asynchronous copies, all in flight at once
      for (int q = threadIdx.x; q < total; q += kThreads) {
        bool ok;
        const TB* src = src_of(q, ok);
        dev::cp_async16(dst_of(q), src, ok ? 16 : 0);
      }
    } else {  // fp32 B: four values -> four TY
      for (int q0 = threadIdx.x; q0 < total; q0 += kThreads * kBatch) {
        float4 v[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          bool ok;
          const TB* src = src_of(q0 + k * kThreads, ok);
          v[k] = ok ? *reinterpret_cast<const float4*>(src) : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          if (q0 + k * kThreads >= total) break;
          TY* dst = dst_of(q0 + k * kThreads);
          dst[0] = from_f<TY>(v[k].x);
          dst[1] = from_f<TY>(v[k].y);
          dst[2] = from_f<TY>(v[k].z);
          dst[3] = from_f<TY>(v[k].w);
        }
      }
    }
  } else {  // unaligned or r not a multiple of the vector width: element by element
    const int total = kBN * kp;
    for (int e0 = threadIdx.x; e0 < total; e0 += kThreads * kBatch) {
      float v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int e = e0 + k * kThreads;
        const int c = e / kp, kk = e % kp;
        const int h = kk / ip;
        const int64_t i = i0 + (kk - h * ip);
        v[k] = (e < total && c0 + c < md.out && i < a.r)
                   ? to_f(b[static_cast<int64_t>(c0 + c) * a.ldb + h * a.r + i])
                   : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int e = e0 + k * kThreads;
        if (e < total) bs[(e / kp) * ld + e % kp] = from_f<TY>(v[k]);
      }
    }
  }
}

// zs[t][ii] = z0, zs[t][ip + ii] = z1 (with_q) for the tile's tokens and i = i0 + ii. One warp per
// row (rows w, w + 4, ...), lanes along i: no index division, coalesced gathers, and a row without an
// adapter is skipped by its whole warp. Such a row's z is left as it is (even NaN): row t of the MMA
// depends only on row t of z, and the epilogue never stores it.
template <typename TY, typename TU>
__device__ void mix_z_tile(const ExpandParams& a, const ExpandModule& md, TY* zs, int ld,
                           const int* s_slot, int64_t t0, int64_t i0, int ip) {
  constexpr int kZB = 2 * kBatch;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = warp; t < kBM; t += kThreads / 32) {
    const int s = s_slot[t];
    if (s < 0) continue;
    const TU* ur = static_cast<const TU*>(a.u) + (t0 + t) * a.ldu;
    const float* ldr = a.lambda_d + (static_cast<int64_t>(s) * a.modules_total + md.module) * a.r;
    const float* pr = a.p + static_cast<int64_t>(s) * a.r;  // dereferenced only with_q
    TY* zr = zs + t * ld;
    for (int ii0 = lane; ii0 < ip; ii0 += 32 * kZB) {
      float u0[kZB], uq[kZB], pv[kZB], lv[kZB];
#pragma unroll
      for (int k = 0; k < kZB; ++k) {
        const int ii = ii0 + 32 * k;
        const int64_t i = i0 + ii;
        u0[k] = uq[k] = lv[k] = 0.0f;  // zeros in the padding past r: B is zero there too
        pv[k] = 1.0f;
        if (ii < ip && i < a.r) {
          u0[k] = to_f(ur[i]);
          lv[k] = ldr[i];
          if (a.with_q) {
            uq[k] = to_f(ur[a.r + i]);
            pv[k] = pr[i];
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kZB; ++k) {
        const int ii = ii0 + 32 * k;
        if (ii >= ip) break;
        if (a.with_q) {
          const float h = lv[k] * (pv[k] * u0[k] + (1.0f - pv[k]) * uq[k]);
          zr[ii] = from_f<TY>(pv[k] * h);
          zr[ip + ii] = from_f<TY>((1.0f - pv[k]) * h);
        } else {
          zr[ii] = from_f<TY>(lv[k] * u0[k]);
        }
      }
    }
  }
}

// One m16n8k16 step of this warp's tile at K offset kk.
template <typename TY>
__device__ __forceinline__ void mma_step(float (&acc)[4], const TY* zs, const TY* bs, int ld,
                                         int n0, int lane, int kk) {
  uint32_t af[4], bf[2];
  dev::ldmatrix_x4(af, zs + (lane % 16) * ld + kk + (lane / 16) * 8);
  dev::ldmatrix_x2(bf, bs + (n0 + lane % 8) * ld + kk + ((lane / 8) % 2) * 8);
  dev::mma_16816<TY>(acc, af, bf);
}

template <typename TY, typename TU, typename TB>
__global__ void __launch_bounds__(kThreads)
    expand_fused_kernel(const ExpandParams a, int ip, bool vec_b) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_slot[kBM];
  const ExpandModule md = a.mod[blockIdx.z];
  const int c0 = blockIdx.x * kBN;
  if (c0 >= md.out) return;  // grid.x covers the widest module of the call
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kBM;
  dev::griddep_wait();  // nothing global is read before the previous kernel's writes are visible

  const int tid = threadIdx.x;
  if (tid < kBM) {
    int s = -1;
    if (t0 + tid < a.rows) s = a.slot[(t0 + tid) * a.slot_stride];
    s_slot[tid] = (s >= 0 && s < a.slots) ? s : -1;
  }
  __syncthreads();
  bool any = false;
#pragma unroll
  for (int t = 0; t < kBM; ++t) any |= s_slot[t] >= 0;
  if (!any) return;  // base-only rows cost no adapter work

  const int kp = (a.with_q ? 2 : 1) * ip;
  const int ld = kp + kPad;
  TY* zs = reinterpret_cast<TY*>(smem_raw);
  TY* bs = zs + kBM * ld;
  const int warp = tid / 32, lane = tid % 32;
  const int n0 = warp * 8;
  // Two accumulators for alternate K steps: halves the chain of dependent MMAs (latency-bound).
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc1[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  for (int64_t i0 = 0; i0 < a.r; i0 += ip) {
    if (i0 > 0) __syncthreads();  // the previous phase's MMAs are done with the tiles
    load_b_tile<TY, TB>(a, md, bs, ld, c0, i0, ip, kp, vec_b);
    mix_z_tile<TY, TU>(a, md, zs, ld, s_slot, t0, i0, ip);  // overlaps the copies in flight
    dev::cp_async_wait_all();
    __syncthreads();
    int kk = 0;
#pragma unroll 2
    for (; kk + 32 <= kp; kk += 32) {
      mma_step<TY>(acc, zs, bs, ld, n0, lane, kk);
      mma_step<TY>(acc1, zs, bs, ld, n0, lane, kk + 16);
    }
    if (kk < kp) mma_step<TY>(acc, zs, bs, ld, n0, lane, kk);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[e] += acc1[e];

  // Epilogue: accumulator (row g | g + 8, columns 2q, 2q + 1) -> y, one rounding per element.
  TY* y = static_cast<TY*>(a.y);
  const int g = lane / 4, q2 = (lane % 4) * 2;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int t = g + hh * 8;
    const int s = s_slot[t];
    if (s < 0) continue;
    TY* yr = y + (t0 + t) * a.ldy + md.y_offset;
    const float* lb = a.lambda_b + static_cast<int64_t>(s) * a.nb + md.lb_offset;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = c0 + n0 + q2 + e;
      if (c < md.out) yr[c] = from_f<TY>(to_f(yr[c]) + lb[c] * acc[hh * 2 + e]);
    }
  }
}

template <typename TY, typename TU, typename TB>
cudaError_t launch_fused(const ExpandParams& a, cudaStream_t stream) {
  const int h = a.with_q ? 2 : 1;
  const int rpad = round_up(a.r, 16);
  const int ip = std::min(rpad, kKMax / h / 16 * 16);
  const int kp = h * ip;
  const size_t smem = static_cast<size_t>(kBM + kBN) * (kp + kPad) * sizeof(TY);
  constexpr int kVW = 16 / sizeof(TB);
  const bool vec_b = a.r % kVW == 0 && a.ldb % kVW == 0 &&
                     reinterpret_cast<uintptr_t>(a.b) % 16 == 0;
  auto kernel = expand_fused_kernel<TY, TU, TB>;
  // Raising the dynamic shared-memory limit is a function attribute, not stream work: legal
  // during graph capture, and idempotent, so it is simply set on every launch that needs it.
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  int max_out = 0;
  for (int j = 0; j < a.n_modules; ++j) max_out = std::max(max_out, a.mod[j].out);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((max_out + kBN - 1) / kBN, static_cast<unsigned>((a.rows + kBM - 1) / kBM),
                     a.n_modules);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = a.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, a, ip, vec_b);
}

template <typename TY, typename TU>
cudaError_t fused_b(const ExpandParams& a, cudaStream_t s) {
  return a.b_dtype == DType::kFloat32 ? launch_fused<TY, TU, float>(a, s)
                                      : launch_fused<TY, TU, TY>(a, s);
}

template <typename TY>
cudaError_t fused_u(const ExpandParams& a, cudaStream_t s) {
  return a.u_dtype == DType::kFloat32 ? fused_b<TY, float>(a, s) : fused_b<TY, TY>(a, s);
}

// ---- GEMM route: mix once, vendor GEMM, epilogue ------------------------------------------------
constexpr int kMixThreads = 256;

template <typename TZ, typename TU>
__global__ void __launch_bounds__(kMixThreads) group_mix_kernel(const ExpandParams a, TZ* z) {
  const int64_t t = blockIdx.x;
  const int j = blockIdx.z;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kMixThreads + threadIdx.x;
  const int s = a.slot[t * a.slot_stride];
  if (s < 0 || s >= a.slots || i >= a.r) return;
  const int64_t rr = a.with_q ? 2 * a.r : a.r;
  const TU* ur = static_cast<const TU*>(a.u) + t * a.ldu;
  TZ* zr = z + (t * a.n_modules + j) * rr;
  const float ld_si = a.lambda_d[(static_cast<int64_t>(s) * a.modules_total + a.mod[j].module) * a.r + i];
  if (a.with_q) {
    const float p = a.p[static_cast<int64_t>(s) * a.r + i];
    const float h = ld_si * (p * to_f(ur[i]) + (1.0f - p) * to_f(ur[a.r + i]));
    zr[i] = from_f<TZ>(p * h);
    zr[a.r + i] = from_f<TZ>((1.0f - p) * h);
  } else {
    zr[i] = from_f<TZ>(ld_si * to_f(ur[i]));
  }
}

template <typename TZ>
cudaError_t mix_u(const ExpandParams& a, void* z, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>((a.r + kMixThreads - 1) / kMixThreads),
                  a.n_modules);
  if (a.u_dtype == DType::kFloat32) {
    group_mix_kernel<TZ, float><<<grid, kMixThreads, 0, stream>>>(a, static_cast<TZ*>(z));
  } else if (a.u_dtype == DType::kBFloat16) {
    group_mix_kernel<TZ, __nv_bfloat16><<<grid, kMixThreads, 0, stream>>>(a, static_cast<TZ*>(z));
  } else {
    group_mix_kernel<TZ, __half><<<grid, kMixThreads, 0, stream>>>(a, static_cast<TZ*>(z));
  }
  return cudaGetLastError();
}

constexpr int kEpiThreads = 256;
constexpr int kEpiVec = 8;  // elements per thread

struct VPtrs {
  const void* p[kMaxExpandModules];
};

// One block: kEpiThreads x 8 columns of one row of one module.
template <typename TY>
__global__ void __launch_bounds__(kEpiThreads)
    expand_epilogue_kernel(const ExpandParams a, VPtrs v, uint32_t vec_mask) {
  const int64_t t = blockIdx.x;
  const int j = blockIdx.z;
  const ExpandModule md = a.mod[j];
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kEpiThreads + threadIdx.x) * kEpiVec;
  if (c >= md.out) return;
  const int s = a.slot[t * a.slot_stride];
  if (s < 0 || s >= a.slots) return;
  TY* yr = static_cast<TY*>(a.y) + t * a.ldy + md.y_offset + c;
  const TY* vr = static_cast<const TY*>(v.p[j]) + t * md.out + c;
  const float* lb = a.lambda_b + static_cast<int64_t>(s) * a.nb + md.lb_offset + c;
  if constexpr (sizeof(TY) == 2) {
    if ((vec_mask >> j & 1u) && c + kEpiVec <= md.out) {  // 16-byte accesses
      uint4 yv = *reinterpret_cast<const uint4*>(yr);
      const uint4 vv = *reinterpret_cast<const uint4*>(vr);
      const float4 l0 = *reinterpret_cast<const float4*>(lb);
      const float4 l1 = *reinterpret_cast<const float4*>(lb + 4);
      const float lv[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
      TY* ye = reinterpret_cast<TY*>(&yv);
      const TY* ve = reinterpret_cast<const TY*>(&vv);
#pragma unroll
      for (int e = 0; e < kEpiVec; ++e) ye[e] = from_f<TY>(to_f(ye[e]) + lv[e] * to_f(ve[e]));
      *reinterpret_cast<uint4*>(yr) = yv;
      return;
    }
  }
  for (int e = 0; e < kEpiVec && c + e < md.out; ++e)
    yr[e] = from_f<TY>(to_f(yr[e]) + lb[e] * to_f(vr[e]));
}

template <typename TY>
cudaError_t epilogue(const ExpandParams& a, const void* const* v, cudaStream_t stream) {
  VPtrs vp = {};
  uint32_t vec_mask = 0;
  int max_out = 0;
  for (int j = 0; j < a.n_modules; ++j) {
    const ExpandModule& md = a.mod[j];
    vp.p[j] = v[j];
    max_out = std::max(max_out, md.out);
    const bool vec = md.y_offset % 8 == 0 && a.ldy % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(a.y) % 16 == 0 && md.out % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(v[j]) % 16 == 0 && md.lb_offset % 4 == 0 &&
                     a.nb % 4 == 0 && reinterpret_cast<uintptr_t>(a.lambda_b) % 16 == 0;
    vec_mask |= static_cast<uint32_t>(vec) << j;
  }
  const int per_block = kEpiThreads * kEpiVec;
  const dim3 grid(static_cast<unsigned>(a.rows), (max_out + per_block - 1) / per_block, a.n_modules);
  expand_epilogue_kernel<TY><<<grid, kEpiThreads, 0, stream>>>(a, vp, vec_mask);
  return cudaGetLastError();
}

}  // namespace

cudaError_t expand_fused_cuda(const ExpandParams& a, cudaStream_t stream) {
  if (a.rows == 0 || a.n_modules == 0) return cudaSuccess;
  if (a.n_modules > kMaxExpandModules) return cudaErrorInvalidValue;
  switch (a.y_dtype) {
    case DType::kBFloat16: return fused_u<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return fused_u<__half>(a, stream);
    default: return cudaErrorInvalidValue;  // fp32 y takes the GEMM route
  }
}

cudaError_t group_mix_cuda(const ExpandParams& a, void* z, DType z_dtype, cudaStream_t stream) {
  if (a.rows == 0 || a.n_modules == 0) return cudaSuccess;
  if (a.n_modules > kMaxExpandModules) return cudaErrorInvalidValue;
  switch (z_dtype) {
    case DType::kFloat32: return mix_u<float>(a, z, stream);
    case DType::kBFloat16: return mix_u<__nv_bfloat16>(a, z, stream);
    default: return mix_u<__half>(a, z, stream);
  }
}

cudaError_t expand_epilogue_cuda(const ExpandParams& a, const void* const* v, DType v_dtype,
                                 cudaStream_t stream) {
  if (a.rows == 0 || a.n_modules == 0) return cudaSuccess;
  if (a.n_modules > kMaxExpandModules || v_dtype != a.y_dtype) return cudaErrorInvalidValue;
  switch (a.y_dtype) {
    case DType::kFloat32: return epilogue<float>(a, v, stream);
    case DType::kBFloat16: return epilogue<__nv_bfloat16>(a, v, stream);
    default: return epilogue<__half>(a, v, stream);
  }
}

}  // namespace uora::kernels
