#include "bindings/checks.h"

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
