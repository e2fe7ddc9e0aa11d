#include "kernels/mt19937.h"

#include <cmath>

namespace uora::kernels {

double kaiming_bound(int64_t fan_in) {
  // The exact expression order of PEFT's _kaiming_init: gain / sqrt(fan), then sqrt(3) * std.
  const double std_dev = std::sqrt(2.0) / std::sqrt(static_cast<double>(fan_in));
  return std::sqrt(3.0) * std_dev;
}

void kaiming_uniform_fill(Mt19937& gen, int64_t fan_in, int64_t count, float* out) {
  const double bound = kaiming_bound(fan_in);
  const float from = static_cast<float>(-bound), to = static_cast<float>(bound);
  const double span = static_cast<double>(to - from);  // float subtraction, as torch does (exact)
  const double lo = static_cast<double>(from);
  constexpr double kInv24 = 1.0 / 16777216.0;  // 2^-24
  for (int64_t i = 0; i < count; ++i) {
    const double x = static_cast<double>(gen() & 0xFFFFFFu) * kInv24;
    out[i] = static_cast<float>(x * span + lo);  // exact in double, one rounding (see header)
  }
}

int vera_kaiming_factors(uint64_t seed, int64_t r, int64_t max_in, int64_t max_out, float* a,
                         float* b) {
  if (r < 1 || max_in < 1 || max_out < 1) return -1;
  Mt19937 gen(static_cast<uint32_t>(seed & 0xFFFFFFFFu));
  kaiming_uniform_fill(gen, max_in, r * max_in, a);  // A: fan_in = size(1) = max_in
  kaiming_uniform_fill(gen, r, max_out * r, b);      // B: fan_in = size(1) = r, same stream
  return 0;
}

}  // namespace uora::kernels
