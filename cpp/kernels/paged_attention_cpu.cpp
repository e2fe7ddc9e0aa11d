#include "kernels/paged_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

// Every function taking or returning a vector is inlined into one clone: no ABI crosses.
#pragma GCC diagnostic ignored "-Wpsabi"

// Attention may contract into FMA and round differently from the reference (CMakeLists.txt gives
// this file -ffp-contract=fast); it never relies on reassociation: every reduction below fixes its
// own order in explicit lanes, so the result depends on neither the thread count nor the item
// order, and the AVX2 and baseline clones differ only by the FMA contraction.
namespace uora::kernels {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UORA_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define UORA_ATTN_CLONES
#endif
#define UORA_INLINE inline __attribute__((always_inline))

constexpr int64_t kW = 8;             // float lanes of one vector
constexpr int64_t kChunk = 32;        // keys per online-softmax step: K and V chunks stay in L1
constexpr int64_t kTileQueries = 48;  // query vectors (rows x group heads) per work item

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#if defined(__clang__)
#define UORA_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define UORA_SHUF(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t tile_rows(int64_t group) { return std::max<int64_t>(1, kTileQueries / group); }

UORA_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
UORA_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
UORA_INLINE v8f splat(float x) { return v8f{} + x; }
UORA_INLINE v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)), in registers.
UORA_INLINE float hsum(v8f v) {
  v += UORA_SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  v += UORA_SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += UORA_SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  return v[0];
}
UORA_INLINE float hmax(v8f v) {
  v = vmax(v, UORA_SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  v = vmax(v, UORA_SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = vmax(v, UORA_SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  return v[0];
}

// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (AVX's hadd).
UORA_INLINE v8f hadd(v8f a, v8f b) {
  return UORA_SHUF(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + UORA_SHUF(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// Lane i of the result is the sum of a[i]'s lanes.
UORA_INLINE v8f transpose_sum(const v8f (&a)[kW]) {
  const v8f c0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
  const v8f c1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return UORA_SHUF(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) + UORA_SHUF(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// 2^x for x <= 0 (Cephes exp2f polynomial on [-1/2, 1/2], ~2e-7 relative); x < -126 gives
// 2^-126, which callers only ever add to sums dominated by 2^0.
UORA_INLINE v8f exp2_neg(v8f x) {
  x = vmax(x, splat(-126.0f));
  const v8f n = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const v8f f = x - n;
  v8f y = splat(1.535336188319500e-4f);
  y = y * f + 1.339887440266574e-3f;
  y = y * f + 9.618437357674640e-3f;
  y = y * f + 5.550332471162809e-2f;
  y = y * f + 2.402264791363012e-1f;
  y = y * f + 6.931472028550421e-1f;
  y = y * f + 1.0f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * (v8f)e;
}

// --- dtype conversions (round to nearest even, as torch's .to()) ---
UORA_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
UORA_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
UORA_INLINE float bf16_to_float(uint16_t h) { return from_bits(uint32_t{h} << 16); }
UORA_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = to_bits(f);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// F. Giesen's half <-> float conversions (exact; denormals through one float add/subtract).
UORA_INLINE float half_to_float(uint16_t h) {
  uint32_t o = (uint32_t{h} & 0x7FFFu) << 13;
  const uint32_t e = o & (0x7C00u << 13);
  o += (127 - 15) << 23;
  if (e == 0x7C00u << 13) {
    o += (128 - 16) << 23;  // inf / nan
  } else if (e == 0) {
    o = to_bits(from_bits(o + (1u << 23)) - from_bits(113u << 23));  // zero / denormal
  }
  return from_bits(o | (uint32_t{h} & 0x8000u) << 16);
}
UORA_INLINE uint16_t float_to_half(float f) {
  uint32_t x = to_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= (127u + 16u) << 23) {  // >= 2^16: inf (or nan)
    o = x > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (x < (127u - 14u) << 23) {  // below the smallest normal half: denormal or zero
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = to_bits(from_bits(x) + from_bits(magic)) - magic;
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += ((15u - 127u) << 23) + 0xFFFu + odd;  // wraps as intended: rebias and round
    o = x >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

template <AttnDtype D>
UORA_INLINE float to_float(const void* base, int64_t i) {
  if constexpr (D == AttnDtype::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (D == AttnDtype::kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <AttnDtype D>
UORA_INLINE void store_from_float(void* base, int64_t i, float v) {
  if constexpr (D == AttnDtype::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else if constexpr (D == AttnDtype::kBFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_half(v);
  }
}

// Eight 16-bit floats to float32: the vector form of the scalar conversions above.
template <AttnDtype D>
UORA_INLINE v8f load8_half(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof h);
  const v8u u = __builtin_convertvector(h, v8u);
  if constexpr (D == AttnDtype::kBFloat16) {
    return (v8f)(u << 16);
  } else {
    v8u o = (u & 0x7FFFu) << 13;
    const v8u e = o & (0x7C00u << 13);
    o += (127u - 15u) << 23;
    o = e == (0x7C00u << 13) ? o + ((128u - 16u) << 23) : o;
    const v8f den = (v8f)(o + (1u << 23)) - (v8f)(v8u{} + (113u << 23));
    o = e == 0 ? (v8u)den : o;
    return (v8f)(o | (u & 0x8000u) << 16);
  }
}

// One K or V row to float32, zero-padded to hdp (a multiple of 8).
template <AttnDtype D>
UORA_INLINE void convert_row(const void* src, float* dst, int64_t hd, int64_t hdp) {
  int64_t d = 0;
  if constexpr (D != AttnDtype::kFloat32) {
    for (; d + kW <= hd; d += kW) store8(dst + d, load8_half<D>(static_cast<const uint16_t*>(src) + d));
  }
  for (; d < hd; ++d) dst[d] = to_float<D>(src, d);
  for (; d < hdp; ++d) dst[d] = 0.0f;
}

// n float16 rows to float32 [n, hdp], zero-padded. A separate call per chunk: the F16C version
// must not be inlined into code that also runs on CPUs without it.
using F16Rows = void (*)(const float* const*, float*, int64_t, int64_t, int64_t);
void f16_rows_generic(const float* const* rows, float* dst, int64_t n, int64_t hd, int64_t hdp) {
  for (int64_t j = 0; j < n; ++j) convert_row<AttnDtype::kFloat16>(rows[j], dst + j * hdp, hd, hdp);
}
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,f16c"))) void f16_rows_f16c(const float* const* rows, float* dst,
                                                       int64_t n, int64_t hd, int64_t hdp) {
  for (int64_t j = 0; j < n; ++j) {
    const char* src = reinterpret_cast<const char*>(rows[j]);
    float* out = dst + j * hdp;
    int64_t d = 0;
    for (; d + kW <= hd; d += kW) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * d));
      _mm256_storeu_ps(out + d, _mm256_cvtph_ps(h));  // exact, like half_to_float
    }
    for (; d < hd; ++d) out[d] = to_float<AttnDtype::kFloat16>(src, d);
    for (; d < hdp; ++d) out[d] = 0.0f;
  }
}
F16Rows pick_f16_rows() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2") ? f16_rows_f16c
                                                                          : f16_rows_generic;
}
#else
F16Rows pick_f16_rows() { return f16_rows_generic; }
#endif
const F16Rows f16_rows = pick_f16_rows();

// acc[0 : NV*8] += sum_j p[j] v[j][0 : NV*8]
template <int NV>
UORA_INLINE void pv_pass(float* acc, const float* p, const float* const* vptr, int64_t n,
                         int64_t d0) {
  v8f a[NV];
  for (int i = 0; i < NV; ++i) a[i] = load8(acc + d0 + i * kW);
  for (int64_t j = 0; j < n; ++j) {
    const v8f pj = splat(p[j]);
    const float* v = vptr[j] + d0;
    for (int i = 0; i < NV; ++i) a[i] += pj * load8(v + i * kW);
  }
  for (int i = 0; i < NV; ++i) store8(acc + d0 + i * kW, a[i]);
}

// One query vector (already scaled by scale * log2 e) against the chunk's first na keys: the
// online-softmax update of its running max mx, denominator l and accumulator acc [hdp].
UORA_INLINE void attend_chunk(const float* q, const float* const* kptr, const float* const* vptr,
                              int64_t na, int64_t hdp, float* s, float* acc, float& mx, float& l) {
  const int64_t nb = (na + kW - 1) / kW;
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8f ninf = splat(-std::numeric_limits<float>::infinity());
  v8f cmax = ninf;
  for (int64_t jb = 0; jb < nb; ++jb) {
    const float* const* kb = kptr + jb * kW;
    v8f a[kW] = {};
    for (int64_t d = 0; d < hdp; d += kW) {
      const v8f qv = load8(q + d);
      for (int i = 0; i < kW; ++i) a[i] += qv * load8(kb[i] + d);
    }
    v8f sv = transpose_sum(a);
    sv = lane + static_cast<int32_t>(jb * kW) < static_cast<int32_t>(na) ? sv : ninf;
    store8(s + jb * kW, sv);
    cmax = vmax(cmax, sv);
  }
  const float m_new = std::max(mx, hmax(cmax));
  const float alpha = exp2_neg(splat(mx - m_new))[0];  // ~0 on the first chunk (mx = -inf)
  v8f vsum = {};
  for (int64_t jb = 0; jb < nb; ++jb) {
    v8f pv = exp2_neg(load8(s + jb * kW) - m_new);
    pv = lane + static_cast<int32_t>(jb * kW) < static_cast<int32_t>(na) ? pv : v8f{};
    store8(s + jb * kW, pv);
    vsum += pv;
  }
  l = l * alpha + hsum(vsum);
  mx = m_new;
  if (alpha != 1.0f) {
    for (int64_t d = 0; d < hdp; d += kW) store8(acc + d, load8(acc + d) * alpha);
  }
  int64_t d = 0;
  for (; d + 8 * kW <= hdp; d += 8 * kW) pv_pass<8>(acc, s, vptr, na, d);
  for (; d + 4 * kW <= hdp; d += 4 * kW) pv_pass<4>(acc, s, vptr, na, d);
  for (; d < hdp; d += kW) pv_pass<1>(acc, s, vptr, na, d);
}

template <AttnDtype D>
UORA_INLINE void run_item(const PagedAttentionParams& p, const PagedAttentionItem& it,
                          float* scratch) {
  constexpr int64_t esize = D == AttnDtype::kFloat32 ? 4 : 2;
  const int64_t g = p.heads / p.kv_heads, hd = p.head_dim, hdp = round_up(hd, kW);
  const int64_t m_max = tile_rows(g) * g;
  const int64_t rows = it.q_end - it.q_begin, nq = rows * g;
  const int64_t ctx = p.seq_lens[it.seq], q0 = p.query_start[it.seq];
  const int64_t q_len = p.query_start[it.seq + 1] - q0;
  const int64_t pos0 = ctx - q_len + it.q_begin;  // absolute position of the tile's first row
  const int64_t key_end = pos0 + rows;
  const int64_t h0 = int64_t{it.kv_head} * g;

  float* qs = scratch;               // [m_max, hdp]
  float* acc = qs + m_max * hdp;     // [m_max, hdp]
  float* mx = acc + m_max * hdp;     // [m_max]
  float* l = mx + m_max;             // [m_max]
  float* s = l + m_max;              // [kChunk]
  float* kbuf = s + kChunk;          // [kChunk, hdp]
  float* vbuf = kbuf + kChunk * hdp;  // [kChunk, hdp]

  // Query vector m = r * g + hh: row q_begin + r, head h0 + hh.
  const float c = p.scale * 1.4426950408889634f;  // softmax in base 2
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t hh = 0; hh < g; ++hh) {
      const int64_t m = r * g + hh;
      const int64_t off = (q0 + it.q_begin + r) * p.q_stride_t + (h0 + hh) * p.q_stride_h;
      for (int64_t d = 0; d < hd; ++d) qs[m * hdp + d] = to_float<D>(p.q, off + d) * c;
      for (int64_t d = hd; d < hdp; ++d) qs[m * hdp + d] = 0.0f;
    }
  }
  std::fill(acc, acc + nq * hdp, 0.0f);
  std::fill(mx, mx + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.0f);

  // float32 rows with hd % 8 == 0 are read in place; others are converted / padded per chunk.
  const bool direct = D == AttnDtype::kFloat32 && hd == hdp;
  const int32_t* table = p.block_tables + int64_t{it.seq} * p.max_blocks;
  const int64_t pos_stride = p.kv_heads * hd * esize;  // bytes between positions of one block
  const int64_t row_bytes = hd * esize;
  const char* kbase = static_cast<const char*>(p.k_cache) + int64_t{it.kv_head} * row_bytes;
  const char* vbase = static_cast<const char*>(p.v_cache) + int64_t{it.kv_head} * row_bytes;
  // The pages are walked one chunk ahead, and the next chunk's rows are prefetched a few lines
  // before each query vector's turn on this chunk: decode reads every K/V row once and waits on
  // memory more than on arithmetic, but a burst of a whole chunk's prefetches at once would only
  // stall on the line-fill buffers. Row addresses are kept as float pointers whatever the dtype;
  // 16-bit rows are only ever read back through char pointers, by the conversion.
  const float* krow[2][kChunk];
  const float* vrow[2][kChunk];
  int64_t blk = 0, in_blk = 0;  // page and offset of the next key to walk
  auto walk = [&](int64_t n, const float** kr, const float** vr) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = (int64_t{table[blk]} * p.block_size + in_blk) * pos_stride;
      kr[j] = reinterpret_cast<const float*>(kbase + e);
      vr[j] = reinterpret_cast<const float*>(vbase + e);
      if (++in_blk == p.block_size) {
        in_blk = 0;
        ++blk;
      }
    }
  };
  int64_t pf_rows = 0, pf_next = 0;  // the next chunk's rows, and the next one to prefetch
  const float** pf_k = nullptr;
  const float** pf_v = nullptr;
  auto prefetch = [&](int64_t count) {
    for (const int64_t end = std::min(pf_rows, pf_next + count); pf_next < end; ++pf_next) {
      const char* kr = reinterpret_cast<const char*>(pf_k[pf_next]);
      const char* vr = reinterpret_cast<const char*>(pf_v[pf_next]);
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kr + b);
        __builtin_prefetch(vr + b);
      }
    }
  };
  const float* kconv[kChunk];
  const float* vconv[kChunk];
  walk(std::min(kChunk, key_end), krow[0], vrow[0]);
  for (int64_t c0 = 0, cur = 0; c0 < key_end; c0 += kChunk, cur ^= 1) {
    const int64_t n = std::min(kChunk, key_end - c0);
    pf_rows = std::max<int64_t>(0, std::min(kChunk, key_end - c0 - kChunk));
    pf_next = 0;
    pf_k = krow[cur ^ 1];
    pf_v = vrow[cur ^ 1];
    walk(pf_rows, pf_k, pf_v);
    const float** kptr = krow[cur];
    const float** vptr = vrow[cur];
    if (!direct) {
      if constexpr (D == AttnDtype::kFloat16) {
        f16_rows(kptr, kbuf, n, hd, hdp);
        f16_rows(vptr, vbuf, n, hd, hdp);
      } else {
        for (int64_t j = 0; j < n; ++j) convert_row<D>(kptr[j], kbuf + j * hdp, hd, hdp);
        for (int64_t j = 0; j < n; ++j) convert_row<D>(vptr[j], vbuf + j * hdp, hd, hdp);
      }
      for (int64_t j = 0; j < n; ++j) {
        kconv[j] = kbuf + j * hdp;
        vconv[j] = vbuf + j * hdp;
      }
      kptr = kconv;
      vptr = vconv;
    }
    for (int64_t j = n; j < round_up(n, kW); ++j) kptr[j] = kptr[0];  // read, never used
    // Causal: row r sees positions <= pos0 + r, so rows before c0 - pos0 see none of the chunk.
    const int64_t r0 = std::max<int64_t>(0, c0 - pos0);
    const int64_t quota = (pf_rows + (rows - r0) * g - 1) / ((rows - r0) * g);  // rows per call
    for (int64_t r = r0; r < rows; ++r) {
      const int64_t na = std::min(n, pos0 + r + 1 - c0);
      for (int64_t hh = 0; hh < g; ++hh) {
        const int64_t m = r * g + hh;
        prefetch(quota);
        attend_chunk(qs + m * hdp, kptr, vptr, na, hdp, s, acc + m * hdp, mx[m], l[m]);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t hh = 0; hh < g; ++hh) {
      const int64_t m = r * g + hh;
      const int64_t off = (q0 + it.q_begin + r) * p.out_stride_t + (h0 + hh) * p.out_stride_h;
      const float inv = 1.0f / l[m];
      for (int64_t d = 0; d < hd; ++d) store_from_float<D>(p.out, off + d, acc[m * hdp + d] * inv);
    }
  }
}

UORA_ATTN_CLONES void run_item_f32(const PagedAttentionParams& p, const PagedAttentionItem& it,
                                   float* scratch) {
  run_item<AttnDtype::kFloat32>(p, it, scratch);
}
UORA_ATTN_CLONES void run_item_bf16(const PagedAttentionParams& p, const PagedAttentionItem& it,
                                    float* scratch) {
  run_item<AttnDtype::kBFloat16>(p, it, scratch);
}
UORA_ATTN_CLONES void run_item_f16(const PagedAttentionParams& p, const PagedAttentionItem& it,
                                   float* scratch) {
  run_item<AttnDtype::kFloat16>(p, it, scratch);
}

}  // namespace

std::vector<PagedAttentionItem> paged_attention_plan(const PagedAttentionParams& p) {
  std::vector<PagedAttentionItem> items;
  const int64_t g = p.heads / p.kv_heads, tr = tile_rows(g);
  for (int64_t b = 0; b < p.seqs; ++b) {
    const int64_t q_len = p.query_start[b + 1] - p.query_start[b], ctx = p.seq_lens[b];
    for (int64_t t0 = 0; t0 < q_len; t0 += tr) {
      const int64_t t1 = std::min(q_len, t0 + tr), rows = t1 - t0;
      // Keys summed over the tile's rows (row j sees ctx - q_len + j + 1), plus the per-row
      // load/store and per-chunk page walk.
      const int64_t keys = rows * (ctx - q_len) + (t0 + 1 + t1) * rows / 2;
      const int64_t cost = (keys * g + rows * g * 4 + (ctx - q_len + t1)) * p.head_dim;
      for (int64_t h = 0; h < p.kv_heads; ++h) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h),
                         static_cast<int32_t>(t0), static_cast<int32_t>(t1), cost});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const PagedAttentionItem& a, const PagedAttentionItem& b) {
                     return a.cost > b.cost;
                   });
  return items;
}

size_t paged_attention_scratch_floats(const PagedAttentionParams& p) {
  const int64_t g = p.heads / p.kv_heads, hdp = round_up(p.head_dim, kW);
  const int64_t m_max = tile_rows(g) * g;
  return static_cast<size_t>(2 * m_max * hdp + 2 * m_max + kChunk + 2 * kChunk * hdp);
}

void paged_attention_item(const PagedAttentionParams& p, const PagedAttentionItem& item,
                          float* scratch) {
  switch (p.dtype) {
    case AttnDtype::kFloat32: return run_item_f32(p, item, scratch);
    case AttnDtype::kBFloat16: return run_item_bf16(p, item, scratch);
    case AttnDtype::kFloat16: return run_item_f16(p, item, scratch);
  }
}

}  // namespace uora::kernels
