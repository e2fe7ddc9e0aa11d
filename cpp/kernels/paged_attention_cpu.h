// Paged attention on the CPU, reading the KV pages in place — torch-free.
//
// For sequence b (query rows query_start[b] : query_start[b+1], the last q_len of its seq_len
// positions), query row j of head h at absolute position pos = seq_len - q_len + j:
//   s[p] = scale * q[row, h] . k(p, h / group)          for p in 0 .. pos
//   out[row, h] = sum_p softmax(s)[p] v(p, h / group)    (float32 accumulation)
// where k(p, kvh) = k_cache[block_tables[b, p / block_size], p % block_size, kvh] (same for v).
//
// The work is split into items (sequence, KV head, tile of query rows); an item computes every
// query head of its KV head's group, so each K/V row it reads serves group * rows queries. The
// caller runs the items in parallel (any order, each exactly once) with one scratch buffer per
// worker; items write disjoint parts of out. Rows past query_start[B] are the caller's to zero.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace uora::kernels {

enum class AttnDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct PagedAttentionParams {
  void* out = nullptr;                   // [T, nH, hd], strides out_stride_t/h, unit last
  const void* q = nullptr;               // [T, nH, hd], strides q_stride_t/h, unit last
  const void* k_cache = nullptr;         // [num_blocks, block_size, nKV, hd] contiguous
  const void* v_cache = nullptr;         // as k_cache
  const int32_t* block_tables = nullptr;  // [B, max_blocks], ids already checked in range
  const int32_t* seq_lens = nullptr;      // [B], q_len <= seq_len already checked
  const int32_t* query_start = nullptr;   // [B + 1], non-decreasing from 0, already checked
  int64_t seqs = 0, heads = 0, kv_heads = 0, head_dim = 0, block_size = 0, max_blocks = 0;
  int64_t q_stride_t = 0, q_stride_h = 0, out_stride_t = 0, out_stride_h = 0;  // elements
  float scale = 1.0f;
  AttnDtype dtype = AttnDtype::kFloat32;  // of q, k_cache, v_cache and out alike
};

struct PagedAttentionItem {
  int32_t seq = 0, kv_head = 0;
  int32_t q_begin = 0, q_end = 0;  // query rows of the sequence, relative to query_start[seq]
  int64_t cost = 0;                // ~ multiply-adds, for scheduling
};

// Every item of one call, most expensive first (a worker pool taking them in this order is a
// longest-processing-time schedule).
std::vector<PagedAttentionItem> paged_attention_plan(const PagedAttentionParams& p);

// Floats of scratch one worker needs (reused across its items).
size_t paged_attention_scratch_floats(const PagedAttentionParams& p);

// Computes one item's output rows.
void paged_attention_item(const PagedAttentionParams& p, const PagedAttentionItem& item,
                          float* scratch);

}  // namespace uora::kernels
