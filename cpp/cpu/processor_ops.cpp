// The OpenAI logit processors on the CPU (min_tokens, logit_bias, repetition / frequency /
// presence penalties): one pass per processed row over only the tokens it lists, instead of a
// dozen small torch ops per step (each a dispatch plus a temporary). Every index is checked
// before anything is written, so a bad table is an error and leaves the logits as they were.
// Semantics: python/uora_rt/kernels/ops.py; oracle: reference.process_logits / record_tokens.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bindings/checks.h"

namespace uora {
namespace {

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  check_dtype(t, name, dtype);
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  check_contiguous(t, name);
}

// Sizes of one step's tables, after their shapes, dtypes and devices were checked.
struct Tables {
  int64_t procs = 0, slots = 0, hist_len = 0;
};

Tables check_tables(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& lens,
                    const at::Tensor& pos, const at::Tensor& scal, const at::Tensor& hist,
                    const at::Tensor& pen) {
  for (auto [t, name] : {std::pair{&rows, "rows"}, {&slots, "slots"}, {&lens, "lens"},
                         {&pos, "pos"}}) {
    check_cpu(*t, name, at::kLong, 1);
  }
  Tables s{rows.size(0), scal.size(0), hist.size(1)};
  check_shape(slots, "slots", "[P]", {s.procs});
  check_shape(lens, "lens", "[P]", {s.procs});
  check_shape(pos, "pos", "[P]", {s.procs});
  check_cpu(scal, "scal", at::kFloat, 2);
  check_shape(scal, "scal", "[S, 3]", {s.slots, 3});
  check_cpu(hist, "hist", at::kLong, 2);
  check_shape(hist, "hist", "[S, L]", {s.slots, s.hist_len});
  check_cpu(pen, "pen", at::kFloat, 2);
  check_shape(pen, "pen", "[S, L]", {s.slots, s.hist_len});
  return s;
}

// Row p's indices: its logits row in [0, n_rows), table row in [0, S), 0 <= pos <= lens and
// lens in [lo, hi].
void check_row(int64_t p, int64_t row, int64_t n_rows, int64_t slot, int64_t n_slots,
               int64_t len, int64_t lo, int64_t hi, int64_t out) {
  TORCH_CHECK(row >= 0 && row < n_rows, "rows[", p, "] = ", row, ": expected in [0, ", n_rows,
              ")");
  TORCH_CHECK(slot >= 0 && slot < n_slots, "slots[", p, "] = ", slot, ": expected in [0, ",
              n_slots, ")");
  TORCH_CHECK(len >= lo && len <= hi, "lens[", p, "] = ", len, ": expected in [", lo, ", ", hi,
              "]");
  TORCH_CHECK(out >= 0 && out <= len, "pos[", p, "] = ", out, ": expected in [0, lens[", p,
              "] = ", len, "]");
}

// No logits row and no table row twice in one call (each is one request's).
void check_distinct(int64_t p, int64_t row, std::vector<char>& row_seen, int64_t slot,
                    std::vector<char>& slot_seen) {
  TORCH_CHECK(!row_seen[row], "rows[", p, "] = ", row, ": listed twice");
  TORCH_CHECK(!slot_seen[slot], "slots[", p, "] = ", slot, ": listed twice");
  row_seen[row] = slot_seen[slot] = 1;
}

void check_tokens(const int64_t* t, int64_t n, int64_t vocab, const char* name, int64_t slot) {
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(t[j] >= 0 && t[j] < vocab, name, "[", slot, ", ", j, "] = ", t[j],
                ": expected a token id in [0, ", vocab, ")");
  }
}

bool penalized(const float* sc) { return sc[0] != 1.0f || sc[1] != 0.0f || sc[2] != 0.0f; }

void process_logits_cpu(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& slots,
                        const at::Tensor& lens, const at::Tensor& pos, const at::Tensor& scal,
                        const at::Tensor& min_tokens, const at::Tensor& stops,
                        const at::Tensor& bias_tok, const at::Tensor& bias_val,
                        const at::Tensor& hist, const at::Tensor& pen) {
  check_cpu(logits, "logits", at::kFloat, 2);
  const Tables s = check_tables(rows, slots, lens, pos, scal, hist, pen);
  check_cpu(min_tokens, "min_tokens", at::kLong, 1);
  check_shape(min_tokens, "min_tokens", "[S]", {s.slots});
  check_cpu(stops, "stops", at::kLong, 2);
  check_cpu(bias_tok, "bias_tok", at::kLong, 2);
  check_cpu(bias_val, "bias_val", at::kFloat, 2);
  const int64_t ks = stops.size(1), kb = bias_tok.size(1);
  check_shape(stops, "stops", "[S, ks]", {s.slots, ks});
  check_shape(bias_tok, "bias_tok", "[S, kb]", {s.slots, kb});
  check_shape(bias_val, "bias_val", "[S, kb]", {s.slots, kb});
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  const int64_t *row_p = rows.data_ptr<int64_t>(), *slot_p = slots.data_ptr<int64_t>(),
                *len_p = lens.data_ptr<int64_t>(), *pos_p = pos.data_ptr<int64_t>();
  const int64_t *min_p = min_tokens.data_ptr<int64_t>(), *stop_p = stops.data_ptr<int64_t>(),
                *btok_p = bias_tok.data_ptr<int64_t>(), *hist_p = hist.data_ptr<int64_t>();
  const float *scal_p = scal.data_ptr<float>(), *bval_p = bias_val.data_ptr<float>(),
              *pen_p = pen.data_ptr<float>();
  std::vector<char> row_seen(n_rows, 0), slot_seen(s.slots, 0);
  for (int64_t p = 0; p < s.procs; ++p) {  // every index first: an error writes nothing
    const int64_t slot = slot_p[p];
    check_row(p, row_p[p], n_rows, slot, s.slots, len_p[p], 1, s.hist_len, pos_p[p]);
    check_distinct(p, row_p[p], row_seen, slot, slot_seen);
    check_tokens(stop_p + slot * ks, ks, vocab, "stops", slot);
    check_tokens(btok_p + slot * kb, kb, vocab, "bias_tok", slot);
    if (penalized(scal_p + slot * 3)) {
      check_tokens(hist_p + slot * s.hist_len, len_p[p], vocab, "hist", slot);
    }
  }
  float* out = logits.data_ptr<float>();
  // One row: min_tokens, logit_bias, then the penalties over its history. next: the row
  // processed after it (or -1), whose history tokens are prefetched into L2 meanwhile.
  auto process_row = [&](int64_t p, int64_t next, std::vector<float>& vals) {
    const int64_t slot = slot_p[p], len = len_p[p];
    float* x = out + row_p[p] * vocab;
    if (pos_p[p] < min_p[slot]) {
      const int64_t* st = stop_p + slot * ks;
      for (int64_t j = 0; j < ks; ++j) x[st[j]] = -std::numeric_limits<float>::infinity();
    }
    const int64_t* bt = btok_p + slot * kb;
    const float* bv = bval_p + slot * kb;
    for (int64_t j = 0; j < kb; ++j) x[bt[j]] += bv[j];
    const float* sc = scal_p + slot * 3;
    if (!penalized(sc)) return;
    // All values are read before any is written: a token seen twice gets the same new value
    // twice, computed from its logit before this step's penalty.
    const int64_t* h = hist_p + slot * s.hist_len;
    const float* pn = pen_p + slot * s.hist_len;
    const float rep = sc[0];
    vals.resize(len);
    const bool more = next >= 0 && penalized(scal_p + slot_p[std::max<int64_t>(next, 0)] * 3);
    const int64_t ahead = more ? len_p[next] : 0;
    const int64_t* hn = more ? hist_p + slot_p[next] * s.hist_len : nullptr;
    const float* xn = more ? out + row_p[next] * vocab : nullptr;
    for (int64_t j = 0; j < len; ++j) {
      if (j < ahead) __builtin_prefetch(xn + hn[j], 1, 2);
      // Both sides computed, then selected: a branch on the sign of a logit is mispredicted
      // half the time (trapping math keeps the compiler from speculating the division itself).
      const float v = x[h[j]], down = v / rep, up = v * rep;
      vals[j] = (v > 0.0f ? down : up) - pn[j];
    }
    for (int64_t j = 0; j < len; ++j) x[h[j]] = vals[j];
  };
  // The cost is random reads of the listed tokens' logits (memory latency, not arithmetic):
  // one thread (two measured no faster: the rows the draw left in the other core's cache
  // move over), prefetching the next row's reads while doing one. Last row first: the rows
  // written or read last (by the model's head, by the previous step's draw) are the ones
  // still in cache, and going forward would evict them before reaching them. Rows are
  // distinct, so neither changes a value.
  std::vector<float> vals;
  for (int64_t p = s.procs - 1; p >= 0; --p) process_row(p, p - 1, vals);
}

void record_tokens_cpu(at::Tensor& hist, at::Tensor& pen, const at::Tensor& tokens,
                       const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& lens,
                       const at::Tensor& pos, const at::Tensor& scal) {
  const Tables s = check_tables(rows, slots, lens, pos, scal, hist, pen);
  check_cpu(tokens, "tokens", at::kLong, 1);
  const int64_t n_tok = tokens.size(0);
  const int64_t *row_p = rows.data_ptr<int64_t>(), *slot_p = slots.data_ptr<int64_t>(),
                *len_p = lens.data_ptr<int64_t>(), *pos_p = pos.data_ptr<int64_t>(),
                *tok_p = tokens.data_ptr<int64_t>();
  std::vector<char> row_seen(n_tok, 0), slot_seen(s.slots, 0);
  for (int64_t p = 0; p < s.procs; ++p) {  // the new token goes to lens[p]: it must fit
    check_row(p, row_p[p], n_tok, slot_p[p], s.slots, len_p[p], 0, s.hist_len - 1, pos_p[p]);
    check_distinct(p, row_p[p], row_seen, slot_p[p], slot_seen);
  }
  int64_t* hist_w = hist.data_ptr<int64_t>();
  float* pen_w = pen.data_ptr<float>();
  const float* scal_p = scal.data_ptr<float>();
  std::vector<int64_t> same;
  for (int64_t p = 0; p < s.procs; ++p) {
    const int64_t slot = slot_p[p], end = len_p[p], tok = tok_p[row_p[p]];
    int64_t* h = hist_w + slot * s.hist_len;
    h[end] = tok;
    const float freq = scal_p[slot * 3 + 1], pres = scal_p[slot * 3 + 2];
    if (freq == 0.0f && pres == 0.0f) continue;
    // One pass over the history: where the token is, and its count among the outputs
    // (positions from end - pos on, itself included).
    const int64_t prompt = end - pos_p[p];
    int64_t n = 0;
    same.clear();
    for (int64_t j = 0; j <= end; ++j) {
      if (h[j] == tok) {
        same.push_back(j);
        n += j >= prompt;
      }
    }
    float v = freq * static_cast<float>(n);
    v = v + pres;
    float* pn = pen_w + slot * s.hist_len;
    for (const int64_t j : same) pn[j] = v;
  }
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CPU, m) {
  m.impl("process_logits_", &uora::process_logits_cpu);
  m.impl("record_tokens_", &uora::record_tokens_cpu);
}
