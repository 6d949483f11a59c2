// bf16 held as uint16_t: widening to float (exact) and rounding back as torch does, shared
// by the CPU decode kernels. Weights and activations are fp32 or bf16; the arithmetic is
// always fp32.
#pragma once

#include <cstdint>
#include <cstring>

namespace hatrack_bf16 {

inline float widen(float v) { return v; }
inline float widen(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t narrow_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) { *y = narrow_bf16(v); }

}  // namespace hatrack_bf16
