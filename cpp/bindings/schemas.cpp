// Every uora tensor op is declared here, once. Implementations are registered per device with
// TORCH_LIBRARY_IMPL at the bottom of cpp/cpu/*.cpp and cpp/cuda/*; Python fake kernels live in
// python/uora_rt/ops.py. `(a!)` marks what an op mutates.
#include <torch/library.h>

TORCH_LIBRARY(uora, m) {
  // One float32 CPU factor of a projection family (algorithm uora-philox-qr-v1, docs/design.md §2):
  // transposed ? [r, n] with orthonormal rows : [n, r] with orthonormal columns.
  m.def("projection_factor(int seed, int stream, int n, int r, bool transposed) -> Tensor");
  // One reinitialization step over every adapted layer (docs/design.md §1). Returns fires [r] int32.
  m.def(
      "reinit_(Tensor lambda_d, Tensor(a!) counts, Tensor(b!) p, Tensor(c!) A, Tensor(d!) B, "
      "Tensor A0, Tensor QA, Tensor B0, Tensor QB, float tau, int k, float alpha) -> Tensor");
  // A, B rebuilt from the initial factors and the reinit record p (same rounding as reinit_).
  m.def("mix_projections(Tensor A0, Tensor QA, Tensor B0, Tensor QB, Tensor p) -> (Tensor, Tensor)");
  // Multi-adapter UORA delta of one input group (docs/design.md §4), accumulated into the group's fused
  // base output y [T, n_out]: per-token slots (-1 = base only), one shrink for the group, one
  // expand per module. with_q = false drops the Q halves (no slot in the batch has p < 1).
  m.def(
      "uora_group_(Tensor(a!) y, Tensor x, Tensor a_cat, Tensor b_cat, Tensor lambda_d, "
      "Tensor lambda_b, Tensor p, Tensor slot, int[] modules, int[] lambda_b_offsets, "
      "int[] y_offsets, int[] outs, bool with_q) -> ()");
  // The same delta when the shrink u = x A_cat^T [T, >= R] was already computed (on the GPU it
  // comes out of the base GEMM, whose weight has A_cat's rows appended): expand only.
  m.def(
      "uora_expand_(Tensor(a!) y, Tensor u, Tensor b_cat, Tensor lambda_d, Tensor lambda_b, "
      "Tensor p, Tensor slot, int[] modules, int[] lambda_b_offsets, int[] y_offsets, int[] outs, "
      "bool with_q) -> ()");
  // PEFT VeRA's Kaiming-uniform MT19937 draw (algorithm peft-vera-kaiming-mt19937), bit for bit:
  // A [r, max_in] then B [max_out, r], float32 CPU.
  m.def("vera_kaiming_factors(int seed, int r, int max_in, int max_out) -> (Tensor, Tensor)");
  // Paged attention over one layer's KV cache (pages read in place): sequence b owns q rows
  // query_start[b] : query_start[b+1], the last q_len of its seq_lens[b] positions (their K/V
  // already in the cache), causal, GQA by head // (nH / nKV); rows past query_start[B] are zeroed.
  // q, out [T, nH, hd]; k_cache, v_cache [num_blocks, block_size, nKV, hd]; block_tables
  // [B, max_blocks], seq_lens [B], query_start [B + 1] int32.
  m.def(
      "paged_attention_(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start, float scale) -> ()");
  // The OpenAI logit processors of one step, in place on the sampled logits [R, V] float32
  // (python/uora_rt/engine/processors.py holds the tables; reference.process_logits states it).
  // Processed row p is logits row rows[p], table row slots[p], with lens[p] tokens so far and
  // pos[p] of them output: min_tokens' -inf, then logit_bias, then repetition and count
  // penalties over the row's history. CPU only (CUDA runs the same steps as torch ops).
  m.def(
      "process_logits_(Tensor(a!) logits, Tensor rows, Tensor slots, Tensor lens, Tensor pos, "
      "Tensor scal, Tensor min_tokens, Tensor stops, Tensor bias_tok, Tensor bias_val, "
      "Tensor hist, Tensor pen) -> ()");
  // After the draw: appends tokens[rows[p]] to its history at lens[p] and, for rows with
  // frequency or presence penalties, gives every history entry of that token its new penalty.
  m.def(
      "record_tokens_(Tensor(a!) hist, Tensor(b!) pen, Tensor tokens, Tensor rows, Tensor slots, "
      "Tensor lens, Tensor pos, Tensor scal) -> ()");
}
