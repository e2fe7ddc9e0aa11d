#include "bindings/checks.h"

#include <cmath>
#include <sstream>

namespace uora {
namespace {
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}
}  // namespace

void check_shape(const at::Tensor& t, const char* name, const char* spec,
                 const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.sizes().vec() == expected, name, ": expected ", spec, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ",
              t.device());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (strides ",
              shape_str(t.strides()), ")");
}

kernels::ReinitParams reinit_params(const at::Tensor& lambda_d, const at::Tensor& counts,
                                    const at::Tensor& p, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& a0, const at::Tensor& qa,
                                    const at::Tensor& b0, const at::Tensor& qb, double tau,
                                    int64_t k, double alpha, const at::Tensor& fires) {
  TORCH_CHECK(lambda_d.dim() == 2, "lambda_d: expected [layers, r], got ",
              shape_str(lambda_d.sizes()));
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "A: expected [r, max_in] and B [max_out, r], got ",
              shape_str(a.sizes()), " and ", shape_str(b.sizes()));
  const int64_t layers = lambda_d.size(0), r = lambda_d.size(1);
  const int64_t max_in = a.size(1), max_out = b.size(0);
  check_shape(counts, "counts", "[layers, r]", {layers, r});
  check_shape(p, "p", "[r]", {r});
  check_shape(a, "A", "[r, max_in]", {r, max_in});
  check_shape(b, "B", "[max_out, r]", {max_out, r});
  check_shape(a0, "A0", "[r, max_in]", {r, max_in});
  check_shape(qa, "QA", "[r, max_in]", {r, max_in});
  check_shape(b0, "B0", "[max_out, r]", {max_out, r});
  check_shape(qb, "QB", "[max_out, r]", {max_out, r});
  check_shape(fires, "fires", "[r]", {r});
  const std::pair<const at::Tensor*, const char*> f32[] = {
      {&lambda_d, "lambda_d"}, {&p, "p"}, {&a, "A"},   {&b, "B"},
      {&a0, "A0"},             {&qa, "QA"}, {&b0, "B0"}, {&qb, "QB"}};
  for (const auto& [t, name] : f32) {
    check_dtype(*t, name, at::kFloat);
    check_same_device(lambda_d, *t, name);
    check_contiguous(*t, name);
  }
  check_dtype(counts, "counts", at::kInt);
  check_dtype(fires, "fires", at::kInt);
  check_same_device(lambda_d, counts, "counts");
  check_contiguous(counts, "counts");
  TORCH_CHECK(k >= 1, "k: expected >= 1, got ", k);
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0, "alpha: expected in (0, 1], got ", alpha);
  TORCH_CHECK(tau >= 0.0, "tau: expected >= 0, got ", tau);

  kernels::ReinitParams q;
  q.lambda_d = lambda_d.data_ptr<float>();
  q.counts = counts.data_ptr<int32_t>();
  q.p = p.data_ptr<float>();
  q.fires = fires.data_ptr<int32_t>();
  q.a = a.data_ptr<float>();
  q.a0 = a0.data_ptr<float>();
  q.qa = qa.data_ptr<float>();
  q.b = b.data_ptr<float>();
  q.b0 = b0.data_ptr<float>();
  q.qb = qb.data_ptr<float>();
  q.layers = layers;
  q.r = r;
  q.max_in = max_in;
  q.max_out = max_out;
  q.tau = static_cast<float>(tau);
  q.k = static_cast<int32_t>(k);
  q.alpha = static_cast<float>(alpha);
  return q;
}

kernels::MixParams mix_params(const at::Tensor& a0, const at::Tensor& qa, const at::Tensor& b0,
                              const at::Tensor& qb, const at::Tensor& p, const at::Tensor& a,
                              const at::Tensor& b) {
  TORCH_CHECK(a0.dim() == 2 && b0.dim() == 2, "A0: expected [r, max_in] and B0 [max_out, r], got ",
              shape_str(a0.sizes()), " and ", shape_str(b0.sizes()));
  const int64_t r = a0.size(0), max_in = a0.size(1), max_out = b0.size(0);
  check_shape(qa, "QA", "[r, max_in]", {r, max_in});
  check_shape(b0, "B0", "[max_out, r]", {max_out, r});
  check_shape(qb, "QB", "[max_out, r]", {max_out, r});
  check_shape(p, "p", "[r]", {r});
  const std::pair<const at::Tensor*, const char*> f32[] = {
      {&a0, "A0"}, {&qa, "QA"}, {&b0, "B0"}, {&qb, "QB"}, {&p, "p"}, {&a, "A"}, {&b, "B"}};
  for (const auto& [t, name] : f32) {
    check_dtype(*t, name, at::kFloat);
    check_same_device(a0, *t, name);
    check_contiguous(*t, name);
  }
  kernels::MixParams q;
  q.p = p.data_ptr<float>();
  q.a0 = a0.data_ptr<float>();
  q.qa = qa.data_ptr<float>();
  q.a = a.data_ptr<float>();
  q.b0 = b0.data_ptr<float>();
  q.qb = qb.data_ptr<float>();
  q.b = b.data_ptr<float>();
  q.r = r;
  q.max_in = max_in;
  q.max_out = max_out;
  return q;
}

}  // namespace uora

namespace uora {

namespace {
// Checks shared by uora_group_ and uora_expand_ once the leading shapes are known.
void check_tables(GroupShape& g, const at::Tensor& y, const at::Tensor& ref, const at::Tensor& b_cat,
                  const at::Tensor& lambda_d, const at::Tensor& lambda_b, const at::Tensor& p,
                  const at::Tensor& slot, at::IntArrayRef modules,
                  at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                  at::IntArrayRef outs, bool with_q) {
  TORCH_CHECK(y.size(0) == g.rows, "y: expected ", g.rows, " rows, got ", y.size(0));
  TORCH_CHECK(y.stride(1) == 1, "y: expected unit stride along the last dim");
  TORCH_CHECK(b_cat.dim() == 2 && b_cat.size(1) >= g.R, "b_cat: expected [max_out, >= ", g.R,
              "], got ", shape_str(b_cat.sizes()));
  TORCH_CHECK(lambda_b.dim() == 2 && lambda_b.size(0) == g.slots,
              "lambda_b: expected [slots = ", g.slots, ", nb], got ", shape_str(lambda_b.sizes()));
  g.nb = lambda_b.size(1);
  if (with_q) check_shape(p, "p", "[slots, r]", {g.slots, g.r});
  check_shape(slot, "slot", "[T]", {g.rows});
  check_dtype(slot, "slot", at::kInt);
  TORCH_CHECK(b_cat.scalar_type() == at::kFloat || b_cat.scalar_type() == y.scalar_type(),
              "b_cat: expected float32 or y's dtype ", y.scalar_type(), ", got ",
              b_cat.scalar_type());
  check_same_device(ref, b_cat, "b_cat");
  for (const auto& [t, name] : {std::pair{&lambda_d, "lambda_d"}, {&lambda_b, "lambda_b"}}) {
    check_dtype(*t, name, at::kFloat);
    check_same_device(ref, *t, name);
    check_contiguous(*t, name);
  }
  if (with_q) {
    check_dtype(p, "p", at::kFloat);
    check_contiguous(p, "p");
    check_same_device(ref, p, "p");
  }
  check_same_device(ref, y, "y");
  check_same_device(ref, slot, "slot");
  const size_t m = modules.size();
  TORCH_CHECK(lambda_b_offsets.size() == m && y_offsets.size() == m && outs.size() == m,
              "modules, lambda_b_offsets, y_offsets, outs: expected equal lengths, got ", m, ", ",
              lambda_b_offsets.size(), ", ", y_offsets.size(), ", ", outs.size());
  for (size_t j = 0; j < m; ++j) {
    TORCH_CHECK(modules[j] >= 0 && modules[j] < g.modules, "modules[", j, "] = ", modules[j],
                ": expected in [0, ", g.modules, ")");
    TORCH_CHECK(outs[j] >= 1 && outs[j] <= b_cat.size(0), "outs[", j, "] = ", outs[j],
                ": expected in [1, max_out = ", b_cat.size(0), "]");
    TORCH_CHECK(y_offsets[j] >= 0 && y_offsets[j] + outs[j] <= g.ny, "y_offsets[", j, "] = ",
                y_offsets[j], " + out ", outs[j], ": expected <= n_out = ", g.ny);
    TORCH_CHECK(lambda_b_offsets[j] >= 0 && lambda_b_offsets[j] + outs[j] <= g.nb,
                "lambda_b_offsets[", j, "] = ", lambda_b_offsets[j], " + out ", outs[j],
                ": expected <= nb = ", g.nb);
  }
  // Modules of one call are accumulated in parallel on the GPU: their columns of y must not overlap.
  for (size_t j = 0; j < m; ++j)
    for (size_t i = 0; i < j; ++i)
      TORCH_CHECK(y_offsets[i] + outs[i] <= y_offsets[j] || y_offsets[j] + outs[j] <= y_offsets[i],
                  "y_offsets: modules ", i, " and ", j, " write overlapping columns [",
                  y_offsets[i], ", ", y_offsets[i] + outs[i], ") and [", y_offsets[j], ", ",
                  y_offsets[j] + outs[j], ")");
}

GroupShape lead_shape(const at::Tensor& y, const at::Tensor& lambda_d, bool with_q) {
  TORCH_CHECK(y.dim() == 2, "y: expected [T, n_out], got ", shape_str(y.sizes()));
  TORCH_CHECK(lambda_d.dim() == 3, "lambda_d: expected [slots, modules, r], got ",
              shape_str(lambda_d.sizes()));
  GroupShape g;
  g.rows = y.size(0);
  g.ny = y.size(1);
  g.slots = lambda_d.size(0);
  g.modules = lambda_d.size(1);
  g.r = lambda_d.size(2);
  g.R = with_q ? 2 * g.r : g.r;
  return g;
}
}  // namespace

GroupShape check_group_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a_cat,
                            const at::Tensor& b_cat, const at::Tensor& lambda_d,
                            const at::Tensor& lambda_b, const at::Tensor& p,
                            const at::Tensor& slot, at::IntArrayRef modules,
                            at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                            at::IntArrayRef outs, bool with_q) {
  GroupShape g = lead_shape(y, lambda_d, with_q);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == g.rows, "x: expected [T = ", g.rows, ", in], got ",
              shape_str(x.sizes()));
  g.in = x.size(1);
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y: expected one dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(a_cat.dim() == 2 && a_cat.size(0) >= g.R && a_cat.size(1) >= g.in,
              "a_cat: expected [>= ", g.R, ", >= in = ", g.in, "], got ", shape_str(a_cat.sizes()));
  TORCH_CHECK(a_cat.scalar_type() == at::kFloat || a_cat.scalar_type() == x.scalar_type(),
              "a_cat: expected float32 or x's dtype, got ", a_cat.scalar_type());
  check_same_device(x, a_cat, "a_cat");
  check_tables(g, y, x, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets,
               outs, with_q);
  return g;
}

GroupShape check_expand_args(const at::Tensor& y, const at::Tensor& u, const at::Tensor& b_cat,
                             const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                             const at::Tensor& p, const at::Tensor& slot, at::IntArrayRef modules,
                             at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                             at::IntArrayRef outs, bool with_q) {
  GroupShape g = lead_shape(y, lambda_d, with_q);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == g.rows && u.size(1) >= g.R, "u: expected [T = ",
              g.rows, ", >= R = ", g.R, "], got ", shape_str(u.sizes()));
  TORCH_CHECK(u.stride(1) == 1, "u: expected unit stride along the last dim");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == y.scalar_type(),
              "u: expected float32 or y's dtype, got ", u.scalar_type());
  check_tables(g, y, u, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets, y_offsets,
               outs, with_q);
  return g;
}

}  // namespace uora

namespace uora {

PagedAttentionShape check_paged_attention_args(const at::Tensor& out, const at::Tensor& q,
                                               const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& seq_lens,
                                               const at::Tensor& query_start, double scale) {
  TORCH_CHECK(q.dim() == 3, "q: expected [T, nH, hd], got ", shape_str(q.sizes()));
  TORCH_CHECK(k_cache.dim() == 4, "k_cache: expected [num_blocks, block_size, nKV, hd], got ",
              shape_str(k_cache.sizes()));
  TORCH_CHECK(block_tables.dim() == 2, "block_tables: expected [B, max_blocks], got ",
              shape_str(block_tables.sizes()));
  PagedAttentionShape s;
  s.tokens = q.size(0);
  s.heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_blocks = k_cache.size(0);
  s.block_size = k_cache.size(1);
  s.kv_heads = k_cache.size(2);
  s.seqs = block_tables.size(0);
  s.max_blocks = block_tables.size(1);
  check_shape(k_cache, "k_cache", "[num_blocks, block_size, nKV, hd = q's]",
              {s.num_blocks, s.block_size, s.kv_heads, s.head_dim});
  check_shape(v_cache, "v_cache", "[num_blocks, block_size, nKV, hd] = k_cache's",
              {s.num_blocks, s.block_size, s.kv_heads, s.head_dim});
  check_shape(out, "out", "[T, nH, hd] = q's", {s.tokens, s.heads, s.head_dim});
  check_shape(seq_lens, "seq_lens", "[B]", {s.seqs});
  check_shape(query_start, "query_start", "[B + 1]", {s.seqs + 1});
  TORCH_CHECK(s.head_dim >= 1 && s.block_size >= 1 && s.kv_heads >= 1,
              "k_cache: expected hd, block_size and nKV >= 1, got ", shape_str(k_cache.sizes()));
  TORCH_CHECK(s.heads % s.kv_heads == 0, "q: expected nH a multiple of nKV (GQA), got nH = ",
              s.heads, ", nKV = ", s.kv_heads);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "q: expected dtype float32, bfloat16 or float16, got ", dt);
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                {&out, "out"}}) {
    check_dtype(*t, name, dt);
    check_same_device(q, *t, name);
  }
  for (const auto& [t, name] : {std::pair{&block_tables, "block_tables"}, {&seq_lens, "seq_lens"},
                                {&query_start, "query_start"}}) {
    check_dtype(*t, name, at::kInt);
    check_same_device(q, *t, name);
    check_contiguous(*t, name);
  }
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  // q and out may be views (q sliced out of a fused qkv projection): any token and head strides.
  TORCH_CHECK(q.stride(2) == 1 || s.head_dim == 1, "q: expected unit stride along hd, got strides ",
              shape_str(q.strides()));
  TORCH_CHECK(out.stride(2) == 1 || s.head_dim == 1,
              "out: expected unit stride along hd, got strides ", shape_str(out.strides()));
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  return s;
}

}  // namespace uora
