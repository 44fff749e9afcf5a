// Eight float lanes as one value, shared by the CPU kernels.
//
// The extension is built for a conservative baseline ISA (x86-64-v2: no AVX/FMA). Hot functions are
// marked FASTVL_MULTIVERSION: cloned for x86-64-v3 (AVX2 + FMA) and picked at load time, so one binary
// is fast on current CPUs and still runs on old ones. Helpers that take or return a vector must be
// inlined into the (cloned) caller: a 32-byte vector is passed in a register under AVX but in memory
// without it, so an out-of-line call between the clones would disagree on the calling convention.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTVL_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTVL_MULTIVERSION
#endif
#define FASTVL_VECTOR_INLINE inline __attribute__((always_inline))

namespace fastvl {
namespace simd8 {

// GCC/Clang vector extensions: one AVX register in the x86-64-v3 clone, two SSE registers otherwise.
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();

FASTVL_VECTOR_INLINE Float8 load8(const float* p) {
  Float8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
FASTVL_VECTOR_INLINE Int8 load8i(const int32_t* p) {
  Int8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
FASTVL_VECTOR_INLINE void store8(float* p, Float8 x) { std::memcpy(p, &x, sizeof(x)); }
FASTVL_VECTOR_INLINE Float8 splat8(float x) { return Float8{} + x; }
FASTVL_VECTOR_INLINE Int8 splat8i(int32_t x) { return Int8{} + x; }
// Written as `a < b ? a : b` so they compile to single min/max instructions.
FASTVL_VECTOR_INLINE Float8 min8(Float8 a, Float8 b) { return a < b ? a : b; }
FASTVL_VECTOR_INLINE Float8 max8(Float8 a, Float8 b) { return b < a ? a : b; }
FASTVL_VECTOR_INLINE float hmax8(Float8 x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}
FASTVL_VECTOR_INLINE float hsum8(Float8 x) {
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// exp(x) lane-wise for x <= ~88: Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, a degree-6
// polynomial for e^r (relative error ~2 ulp), 2^n built in the exponent bits. x < -87.3 (including
// -inf: masked scores, zero value vectors) gives exactly 0, so those terms contribute nothing at all
// rather than 1e-38.
FASTVL_VECTOR_INLINE Float8 exp8(Float8 x) {
  const Float8 clamped = min8(max8(x, splat8(-87.3f)), splat8(88.0f));
  // Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |t| < 2^22).
  const Float8 n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Float8 r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  Float8 p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Float8 er = p * r * r + r + 1.0f;
  const Int8 bits = (__builtin_convertvector(n, Int8) + 127) << 23;  // 2^n, n in [-126, 127]
  Float8 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.3f ? Float8{} : er * two_n;
}

}  // namespace simd8
}  // namespace fastvl
