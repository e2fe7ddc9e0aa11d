// CPU multi-adapter UORA group op: the two GEMMs through ATen (MKL/oneDNN), the element-wise
// stages through the torch-free kernels. Only rows that carry an adapter cost anything.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "bindings/checks.h"
#include "kernels/adapter_cpu.h"

namespace uora {
namespace {

void uora_group_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_cat,
                    const at::Tensor& b_cat, const at::Tensor& lambda_d,
                    const at::Tensor& lambda_b, const at::Tensor& p, const at::Tensor& slot,
                    at::IntArrayRef modules, at::IntArrayRef lambda_b_offsets,
                    at::IntArrayRef y_offsets, at::IntArrayRef outs, bool with_q) {
  const GroupShape g = check_group_args(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules,
                                        lambda_b_offsets, y_offsets, outs, with_q);
  const auto slot_c = slot.contiguous();
  const int32_t* s = slot_c.data_ptr<int32_t>();
  std::vector<int64_t> rows;
  rows.reserve(g.rows);
  for (int64_t t = 0; t < g.rows; ++t)
    if (s[t] >= 0) rows.push_back(t);
  if (rows.empty() || modules.empty()) return;
  const int64_t n = static_cast<int64_t>(rows.size());
  const auto idx = at::from_blob(rows.data(), {n}, at::kLong).clone();
  const auto slots = slot_c.index_select(0, idx);
  const auto xs = x.index_select(0, idx).to(at::kFloat);
  const auto u = at::mm(xs, a_cat.narrow(0, 0, g.R).narrow(1, 0, g.in).t()).contiguous();
  // float32 y is updated in place; other dtypes accumulate in float32 and round once.
  const bool f32 = y.scalar_type() == at::kFloat;
  at::Tensor ybuf = f32 ? y : y.index_select(0, idx).to(at::kFloat);
  const auto dest = f32 ? idx : at::arange(n, at::kLong);
  auto z = at::empty({n, g.R}, x.options().dtype(at::kFloat));
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
    const auto v = at::mm(z, b_cat.narrow(0, 0, outs[j]).narrow(1, 0, g.R).t()).contiguous();
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

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CPU, m) { m.impl("uora_group_", &uora::uora_group_cpu); }
