// CPU paged attention: the shared argument check, the table values the CPU can check for free
// (the GPU could not without a host sync), then the kernel's work items on torch's intra-op pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "bindings/checks.h"
#include "kernels/paged_attention_cpu.h"

namespace uora {
namespace {

void check_table_values(const PagedAttentionShape& s, const int32_t* query_start,
                        const int32_t* seq_lens, const int32_t* block_tables) {
  TORCH_CHECK(query_start[0] == 0, "query_start[0]: expected 0, got ", query_start[0]);
  for (int64_t b = 0; b < s.seqs; ++b) {
    const int64_t q_len = int64_t{query_start[b + 1]} - query_start[b];
    const int64_t ctx = seq_lens[b];
    TORCH_CHECK(q_len >= 0, "query_start: expected non-decreasing, got query_start[", b,
                "] = ", query_start[b], " > query_start[", b + 1, "] = ", query_start[b + 1]);
    TORCH_CHECK(ctx >= 0, "seq_lens[", b, "] = ", ctx, ": expected >= 0");
    TORCH_CHECK(q_len <= ctx, "sequence ", b, ": q_len = query_start[", b + 1, "] - query_start[",
                b, "] = ", q_len, " exceeds seq_lens[", b, "] = ", ctx,
                " (the step's own tokens are part of the context)");
    if (q_len == 0) continue;  // its pages are never read
    const int64_t blocks = (ctx + s.block_size - 1) / s.block_size;
    TORCH_CHECK(blocks <= s.max_blocks, "seq_lens[", b, "] = ", ctx, ": needs ", blocks,
                " blocks of ", s.block_size, ", expected <= max_blocks = ", s.max_blocks);
    const int32_t* row = block_tables + b * s.max_blocks;
    for (int64_t i = 0; i < blocks; ++i) {
      TORCH_CHECK(row[i] >= 0 && row[i] < s.num_blocks, "block_tables[", b, ", ", i, "] = ",
                  row[i], ": expected in [0, num_blocks = ", s.num_blocks, ")");
    }
  }
  TORCH_CHECK(query_start[s.seqs] <= s.tokens, "query_start[B = ", s.seqs,
              "] = ", query_start[s.seqs], ": expected <= T = ", s.tokens);
}

kernels::AttnDtype attn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return kernels::AttnDtype::kBFloat16;
    case at::kHalf: return kernels::AttnDtype::kFloat16;
    default: return kernels::AttnDtype::kFloat32;  // the check admitted nothing else
  }
}

void paged_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& query_start,
                         double scale) {
  const PagedAttentionShape s = check_paged_attention_args(out, q, k_cache, v_cache, block_tables,
                                                           seq_lens, query_start, scale);
  check_table_values(s, query_start.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                     block_tables.data_ptr<int32_t>());
  const int64_t used = query_start.data_ptr<int32_t>()[s.seqs];
  if (used < s.tokens) out.narrow(0, used, s.tokens - used).zero_();  // padding rows

  kernels::PagedAttentionParams p;
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start = query_start.data_ptr<int32_t>();
  p.seqs = s.seqs;
  p.heads = s.heads;
  p.kv_heads = s.kv_heads;
  p.head_dim = s.head_dim;
  p.block_size = s.block_size;
  p.max_blocks = s.max_blocks;
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.out_stride_t = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.scale = static_cast<float>(scale);
  p.dtype = attn_dtype(q.scalar_type());

  const auto items = kernels::paged_attention_plan(p);
  if (items.empty()) return;
  const size_t scratch = kernels::paged_attention_scratch_floats(p);
  // at::parallel_for hands each thread one contiguous range; items differ in cost by orders of
  // magnitude (decode rows vs prefill tiles), so the workers instead pull items, most expensive
  // first, from one shared counter.
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items.size());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(scratch);
    for (size_t i = next++; i < items.size(); i = next++) {
      kernels::paged_attention_item(p, items[i], buf.data());
    }
  });
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CPU, m) { m.impl("paged_attention_", &uora::paged_attention_cpu); }
