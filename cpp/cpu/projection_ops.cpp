// Projection generation runs on the CPU only: the bits are defined by the float64 CPU algorithm,
// and GPU users upload the float32 result (a few MB, once per family).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels/projections.h"

namespace uora {
namespace {

at::Tensor projection_factor(int64_t seed, int64_t stream, int64_t n, int64_t r, bool transposed) {
  TORCH_CHECK(seed >= 0, "projection seed: expected >= 0, got ", seed);
  TORCH_CHECK(stream >= 0 && stream <= 3, "projection stream: expected 0..3, got ", stream);
  TORCH_CHECK(r >= 1, "projection rank r: expected >= 1, got ", r);
  TORCH_CHECK(n >= r, "projection size: an orthonormal [", n, ", ", r,
              "] factor needs n >= r, got n = ", n, " < r = ", r);
  auto out = transposed ? at::empty({r, n}, at::kFloat) : at::empty({n, r}, at::kFloat);
  const int rc = kernels::build_orthonormal(static_cast<uint64_t>(seed),
                                            static_cast<uint32_t>(stream), n, r, transposed,
                                            out.data_ptr<float>(), at::get_num_threads());
  TORCH_CHECK(rc == 0, "projection_factor failed with code ", rc);
  return out;
}

}  // namespace
}  // namespace uora

TORCH_LIBRARY_IMPL(uora, CompositeExplicitAutograd, m) {
  m.impl("projection_factor", &uora::projection_factor);
}
