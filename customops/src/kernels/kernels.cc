// Kernel dispatch, the portable scalar implementation, and IEEE half <-> float conversion.
//
// Dequantization is exactly (float(q) - float(z)) * s in f32. q and z are small integers, so the
// subtraction is done in int (exact, and equal to the f32 subtraction) and followed by a single f32
// multiply: one rounding, bit-identical to numpy. This TU is compiled with -ffp-contract=off.
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "edgemoe/kernels.h"
#include "kernel_impls.h"

namespace edgemoe {

// ---------------------------------------------------------------------------------------------------
// half <-> float

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf / nan (payload kept)
  if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (man << 13));
  // zero / subnormal: man * 2^-24, exact in f32
  return float_of(sign | bits_of(static_cast<float>(man) * 0x1p-24f));
}

uint16_t float_to_half(float f) {
  const uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) {                                // inf / nan
    if (ax == 0x7F800000u) return sign | 0x7C00u;
    uint32_t m = (ax >> 13) & 0x3FFu;                     // keep the top payload bits
    if (m == 0) m = 0x200;                                // ... but stay a nan
    return static_cast<uint16_t>(sign | 0x7C00u | m);
  }
  if (ax >= 0x477FF000u) return sign | 0x7C00u;          // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {                                // normal half (>= 2^-14)
    uint32_t h = (ax >> 13) - (112u << 10);
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
    return static_cast<uint16_t>(sign | h);
  }
  if (ax <= 0x33000000u) return sign;                     // <= 2^-25 rounds to (signed) zero
  // subnormal half: m = round_even(|f| / 2^-24)
  const uint32_t e = ax >> 23;                            // 102..112
  const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;     // |f| = mant * 2^(e - 150)
  const uint32_t shift = 126 - e;                         // 14..24
  uint32_t m = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (m & 1u))) ++m;       // m == 0x400 is the smallest normal: fine
  return static_cast<uint16_t>(sign | m);
}

// ---------------------------------------------------------------------------------------------------
// scalar implementation

namespace detail {
namespace {

// One weight of row `r` (row pointer `row`), quantized formats only.
inline int q_at(WDType dt, const uint8_t* row, int64_t c) {
  if (dt == WDType::U8) return row[c];
  return packed_at(row, c, wdtype_bits(dt));  // U4 / U3 / U2
}

// out[c] = W[r, c] for c in [0, cols).
void dequant_row_impl(const QMatrix& W, int64_t r, float* out) {
  const int64_t K = W.cols;
  const uint8_t* row = static_cast<const uint8_t*>(W.data) + r * row_bytes(W);
  switch (W.dtype) {
    case WDType::F32:
      std::memcpy(out, row, static_cast<size_t>(K) * 4);
      return;
    case WDType::F16:
      for (int64_t c = 0; c < K; ++c) {
        uint16_t h;
        std::memcpy(&h, row + 2 * c, 2);
        out[c] = half_to_float(h);
      }
      return;
    case WDType::U8:
    case WDType::U4:
    case WDType::U3:
    case WDType::U2: {
      const int64_t G = num_groups(W);
      for (int64_t g = 0; g < G; ++g) {
        const float s = half_to_float(W.scales[r * G + g]);
        const int z = W.zeros[r * G + g];
        const int64_t end = (g + 1) * W.group_size < K ? (g + 1) * W.group_size : K;
        for (int64_t c = g * W.group_size; c < end; ++c)
          out[c] = static_cast<float>(q_at(W.dtype, row, c) - z) * s;
      }
      return;
    }
  }
}

float dot(const float* a, const float* b, int64_t K) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t c = 0;
  for (; c + 4 <= K; c += 4) {
    s0 += a[c] * b[c];
    s1 += a[c + 1] * b[c + 1];
    s2 += a[c + 2] * b[c + 2];
    s3 += a[c + 3] * b[c + 3];
  }
  for (; c < K; ++c) s0 += a[c] * b[c];
  return (s0 + s1) + (s2 + s3);
}

// Fused dequantize + dot of row r with x (n == 1): no scratch round trip.
float dot_row(const QMatrix& W, int64_t r, const float* x) {
  const int64_t K = W.cols;
  const uint8_t* row = static_cast<const uint8_t*>(W.data) + r * row_bytes(W);
  if (W.dtype == WDType::F32) {
    return dot(static_cast<const float*>(W.data) + r * K, x, K);
  }
  float acc = 0;
  if (W.dtype == WDType::F16) {
    for (int64_t c = 0; c < K; ++c) {
      uint16_t h;
      std::memcpy(&h, row + 2 * c, 2);
      acc += half_to_float(h) * x[c];
    }
    return acc;
  }
  const int64_t G = num_groups(W);
  for (int64_t g = 0; g < G; ++g) {
    const float s = half_to_float(W.scales[r * G + g]);
    const int z = W.zeros[r * G + g];
    const int64_t end = (g + 1) * W.group_size < K ? (g + 1) * W.group_size : K;
    float part = 0;
    for (int64_t c = g * W.group_size; c < end; ++c) {
      const float w = static_cast<float>(q_at(W.dtype, row, c) - z) * s;
      part += w * x[c];
    }
    acc += part;
  }
  return acc;
}

}  // namespace

void dequant_row_scalar(const QMatrix& W, int64_t r, float* out) { dequant_row_impl(W, r, out); }

void gemm_rows_scalar(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
                      int64_t r0, int64_t r1, float* scratch) {
  if (n <= 0 || r0 >= r1) return;
  for (int64_t r = r0; r < r1; ++r) {
    const float b = W.bias ? W.bias[r] : 0.0f;
    if (n == 1) {
      Y[r] = dot_row(W, r, X) + b;
      continue;
    }
    // Dequantize the row once, then reuse it for every token.
    const float* w = scratch;
    if (W.dtype == WDType::F32)
      w = static_cast<const float*>(W.data) + r * W.cols;
    else
      dequant_row_impl(W, r, scratch);
    for (int64_t i = 0; i < n; ++i) Y[i * ldy + r] = dot(w, X + i * ldx, W.cols) + b;
  }
}

namespace {
const KernelImpl kScalarImpl = {"scalar", gemm_rows_scalar, dequant_row_scalar};

#if defined(EDGEMOE_HAVE_AVX2)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

// Best available implementation, or the one named by EDGEMOE_KERNEL (if it exists on this machine).
const KernelImpl* choose_impl() {
  if (const char* env = std::getenv("EDGEMOE_KERNEL"); env && *env)
    if (const KernelImpl* impl = find_kernel_impl(env)) return impl;
  for (const char* name : {"neon", "avx2"})
    if (const KernelImpl* impl = find_kernel_impl(name)) return impl;
  return &kScalarImpl;
}

const KernelImpl& active_impl() {
  static const KernelImpl* const impl = choose_impl();  // chosen once, thread-safe
  return *impl;
}
}  // namespace
}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// public API

const KernelImpl* find_kernel_impl(const char* name) {
  if (name == nullptr) return nullptr;
  if (std::strcmp(name, "scalar") == 0) return &detail::kScalarImpl;
#if defined(EDGEMOE_HAVE_AVX2)
  if (std::strcmp(name, "avx2") == 0) {
    static const bool ok = detail::cpu_has_avx2();
    return ok ? &detail::kAvx2Impl : nullptr;
  }
#endif
#if defined(EDGEMOE_HAVE_NEON)
  if (std::strcmp(name, "neon") == 0) return &detail::kNeonImpl;  // NEON is baseline on aarch64
#endif
  return nullptr;
}

const char* kernel_path() { return detail::active_impl().name; }

void gemm_rows(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy, int64_t r0,
               int64_t r1, float* scratch) {
  detail::active_impl().gemm_rows(W, X, n, ldx, Y, ldy, r0, r1, scratch);
}

void dequant_row(const QMatrix& W, int64_t r, float* out) { detail::active_impl().dequant_row(W, r, out); }

size_t gemm_scratch_floats(const QMatrix& W) {
  const int64_t scalar = W.cols;                                   // one dequantized row
  const int64_t panel = detail::kSimdScratchFloats;               // SIMD paths: panels of rows
  return static_cast<size_t>(scalar > panel ? scalar : panel);
}

}  // namespace edgemoe
