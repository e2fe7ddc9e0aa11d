// CPU multi-adapter UORA group op: the two GEMMs through ATen (MKL/oneDNN), the element-wise
// stages through the torch-free kernels. Only rows that carry an adapter cost anything.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "bindings/checks.h"
#include "kernels/adapter_cpu.h"

namespace uora {
namespace {

// Adds the deltas of the compacted adapter rows: u [n, R] float32 (rows `idx` of y), slots [n].
void expand_rows(at::Tensor& y, const at::Tensor& u, const at::Tensor& idx, const at::Tensor& slots,
                 const at::Tensor& b_cat, const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                 const at::Tensor& p, at::IntArrayRef modules, at::IntArrayRef lambda_b_offsets,
                 at::IntArrayRef y_offsets, at::IntArrayRef outs, const GroupShape& g,
                 bool with_q) {
  const int64_t n = idx.size(0);
  // float32 y is updated in place; other dtypes accumulate in float32 and round once.
  const bool f32 = y.scalar_type() == at::kFloat;
  at::Tensor ybuf = f32 ? y : y.index_select(0, idx).to(at::kFloat);
  const auto dest = f32 ? idx : at::arange(n, at::kLong);
  const auto bf = b_cat.to(at::kFloat);
  auto z = at::empty({n, g.R}, u.options());
  for (size_t j = 0; j < modules.size(); ++j) {
    kernels::GroupMixParams mp;
    mp.u = u.data_ptr<float>();
    mp.lambda_d = lambda_d.data_ptr<float>();
    mp.p = with_q ? p.data_ptr<float>() : nullptr;
    mp.slot = slots.data_ptr<int32_t>();
    mp.z = z.data_ptr<float>();
    mp.rows = n;
    mp.r = g.r;
    mp.R = g.R;
    mp.modules = g.modules;
    mp.module = modules[j];
    kernels::group_mix_cpu(mp);
    const auto v = at::mm(z, bf.narrow(0, 0, outs[j]).narrow(1, 0, g.R).t()).contiguous();
    kernels::ExpandParams ep;
    ep.v = v.data_ptr<float>();
    ep.lambda_b = lambda_b.data_ptr<float>();
    ep.slot = slots.data_ptr<int32_t>();
    ep.row_index = dest.data_ptr<int64_t>();
    ep.y = ybuf.data_ptr<float>();
    ep.rows = n;
    ep.out = outs[j];
    ep.nb = g.nb;
    ep.offset = lambda_b_offsets[j];
    ep.col0 = y_offsets[j];
    ep.ldy = ybuf.stride(0);
    kernels::expand_accumulate_cpu(ep);
  }
  if (!f32) y.index_copy_(0, idx, ybuf.to(y.scalar_type()));
}

// Rows of slot that carry an adapter, as (row indices, their slots); empty when none does.
std::pair<at::Tensor, at::Tensor> adapter_rows(const at::Tensor& slot, int64_t slots) {
  const auto slot_c = slot.contiguous();
  const int32_t* s = slot_c.data_ptr<int32_t>();
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < slot_c.size(0); ++t) {
    // The CPU can check what the GPU cannot without a host sync (there: treated as -1).
    TORCH_CHECK(s[t] < slots, "slot[", t, "] = ", s[t], ": expected < slots = ", slots);
    if (s[t] >= 0) rows.push_back(t);
  }
  const auto idx = at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong).clone();
  return {idx, slot_c.index_select(0, idx)};
}

void uora_group_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_cat,
                    const at::Tensor& b_cat, const at::Tensor& lambda_d,
                    const at::Tensor& lambda_b, const at::Tensor& p, const at::Tensor& slot,
                    at::IntArrayRef modules, at::IntArrayRef lambda_b_offsets,
                    at::IntArrayRef y_offsets, at::IntArrayRef outs, bool with_q) {
  const GroupShape g = check_group_args(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules,
                                        lambda_b_offsets, y_offsets, outs, with_q);
  const auto [idx, slots] = adapter_rows(slot, g.slots);
  if (idx.size(0) == 0 || modules.empty()) return;
  // The shared shrink, for adapter rows only: base-only rows cost nothing.
  // Every row carries an adapter (the common case): no gather copy.
  const auto xs = (idx.size(0) == g.rows ? x : x.index_select(0, idx)).to(at::kFloat);
  const auto a = a_cat.narrow(0, 0, g.R).narrow(1, 0, g.in).to(at::kFloat);
  const auto u = at::mm(xs, a.t()).contiguous();
  expand_rows(y, u, idx, slots, b_cat, lambda_d, lambda_b, p, modules, lambda_b_offsets, y_offsets,
              outs, g, with_q);
}

void uora_expand_cpu(at::Tensor& y, const at::Tensor& u, const at::Tensor& b_cat,
                     const at::Tensor& lambda_d, const at::Tensor& lambda_b, const at::Tensor& p,
                     const at::Tensor& slot, at::IntArrayRef modules,
                     at::IntArrayRef lambda_b_offsets, at::IntArrayRef y_offsets,
                     at::IntArrayRef outs, bool with_q) {
  const GroupShape g = check_expand_args(y, u, b_cat, lambda_d, lambda_b, p, slot, modules,
                                         lambda_b_offsets, y_offsets, outs, with_q);
  const auto [idx, slots] = adapter_rows(slot, g.slots);
  if (idx.size(0) == 0 || modules.empty()) return;
  const auto us = u.narrow(1, 0, g.R).index_select(0, idx).to(at::kFloat).contiguous();
  expand_rows(y, us, idx, slots, b_cat, lambda_d, lambda_b, p, modules, lambda_b_offsets, y_offsets,
              outs, g, with_q);
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CPU, m) {
  m.impl("uora_group_", &uora::uora_group_cpu);
  m.impl("uora_expand_", &uora::uora_expand_cpu);
}
