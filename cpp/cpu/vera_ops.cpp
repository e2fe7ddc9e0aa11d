// PEFT VeRA's projection draw (kernels/mt19937.h). Like projection_factor it takes no tensor, so it
// is registered once under CompositeExplicitAutograd and always returns CPU float32 tensors: PEFT
// draws on the CPU too, and GPU users upload the result once per family.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/mt19937.h"

namespace uora {
namespace {

std::tuple<at::Tensor, at::Tensor> vera_kaiming_factors(int64_t seed, int64_t r, int64_t max_in,
                                                        int64_t max_out) {
  TORCH_CHECK(r >= 1, "vera_kaiming_factors: r: expected >= 1, got ", r);
  TORCH_CHECK(max_in >= 1 && max_out >= 1,
              "vera_kaiming_factors: max_in, max_out: expected >= 1, got ", max_in, ", ", max_out);
  auto a = at::empty({r, max_in}, at::kFloat);   // [r, max_in]
  auto b = at::empty({max_out, r}, at::kFloat);  // [max_out, r]
  // Any int64 seed is legal: torch keeps only its low 32 bits (two's complement for negatives).
  const int rc = kernels::vera_kaiming_factors(static_cast<uint64_t>(seed), r, max_in, max_out,
                                               a.data_ptr<float>(), b.data_ptr<float>());
  TORCH_CHECK(rc == 0, "vera_kaiming_factors failed with code ", rc);
  return {a, b};
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CompositeExplicitAutograd, m) {
  m.impl("vera_kaiming_factors", &uora::vera_kaiming_factors);
}
