// PEFT VeRA's projection draw, algorithm "peft-vera-kaiming-mt19937" (docs/design.md §2).
//
// PEFT builds vera_A [r, max_in] and then vera_B [max_out, r] from ONE CPU torch.Generator seeded
// with projection_prng_key, each with Kaiming-uniform values:
//   bound  = sqrt(3) * (sqrt(2) / sqrt(fan_in))      in double; fan_in = max_in for A, r for B
//   from   = float(-bound), to = float(bound)
//   x      = (u & 0xFFFFFF) * 2^-24                  u: the next 32-bit MT19937 output, row-major
//   value  = x * (to - from) + from                  ONE rounding to float32
// torch's CPU kernel evaluates the last line in float with an FMA; we evaluate it in double, where
// it is exact: with to - from = m * 2^e (m < 2^24), x * (to - from) = k * m * 2^(e-24) and
// from = -m * 2^(e-1) are multiples of 2^(e-24) and the sum lies below 2^(e+24), i.e. 48 bits.
// So the one cast to float is the same single rounding, and the same bits, as the FMA.
// The MT19937 engine is the textbook one (Matsumoto & Nishimura 1998, init_genrand), which is what
// at::mt19937 implements; torch seeds it with the low 32 bits of the seed.
#pragma once
#include <cstdint>

namespace uora::kernels {

constexpr const char* kVeraAlgorithm = "peft-vera-kaiming-mt19937";

class Mt19937 {
 public:
  explicit Mt19937(uint32_t seed) {
    state_[0] = seed;
    for (int j = 1; j < kN; ++j) {
      const uint32_t prev = state_[j - 1];
      state_[j] = 1812433253u * (prev ^ (prev >> 30)) + static_cast<uint32_t>(j);
    }
    next_ = kN;  // the first call twists, as init_genrand's left = 1 does
  }

  uint32_t operator()() {
    if (next_ >= kN) twist();
    uint32_t y = state_[next_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9D2C5680u;
    y ^= (y << 15) & 0xEFC60000u;
    y ^= y >> 18;
    return y;
  }

 private:
  static constexpr int kN = 624, kM = 397;
  static constexpr uint32_t kMatrixA = 0x9908B0DFu, kUpper = 0x80000000u, kLower = 0x7FFFFFFFu;

  void twist() {
    for (int i = 0; i < kN; ++i) {
      const uint32_t y = (state_[i] & kUpper) | (state_[(i + 1) % kN] & kLower);
      state_[i] = state_[(i + kM) % kN] ^ (y >> 1) ^ ((y & 1u) ? kMatrixA : 0u);
    }
    next_ = 0;
  }

  uint32_t state_[kN];
  int next_;
};

// bound of PEFT's _kaiming_init for a tensor whose fan_in is `fan_in`.
double kaiming_bound(int64_t fan_in);

// Draws `count` values U(-bound(fan_in), bound(fan_in)) from gen into out, in order.
void kaiming_uniform_fill(Mt19937& gen, int64_t fan_in, int64_t count, float* out);

// A [r, max_in] then B [max_out, r] (row-major float32) from one engine seeded with seed's low
// 32 bits. Returns 0, or -1 for a non-positive size.
int vera_kaiming_factors(uint64_t seed, int64_t r, int64_t max_in, int64_t max_out, float* a,
                         float* b);

}  // namespace uora::kernels
