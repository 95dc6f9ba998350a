// Small vectorizable math shared by the native kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace pf_engine {

// exp(x) in plain float arithmetic that the compiler vectorizes (libm's expf is
// a call per element): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor-like polynomial (Cephes' coefficients), 2^k put in the exponent bits.
// Within 2 ulp of exp for finite results; 0 below -87.3 and inf above 88.7.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float k = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;  // ln2 in two parts, exact first product
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x > 88.7f ? std::numeric_limits<float>::infinity() : (x < -87.3f ? 0.0f : e);
}

}  // namespace pf_engine
