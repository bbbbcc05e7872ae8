// NEON (AdvSIMD) kernels for aarch64. AdvSIMD, including the f16 <-> f32 conversions used here, is part of
// the AArch64 base architecture, so this path needs no runtime CPU check: kernels.cc lists it whenever
// EDGEMOE_HAVE_NEON is defined (CMake compiles this file on aarch64 only).
//
// Dequantization is bit-identical to the scalar path and to numpy: d = q - z by a widening integer
// subtraction (exact), one int32 -> f32 conversion (exact, |d| <= 255) and one f32 multiply by the f16
// scale (f16 -> f32 is exact). That product is materialized before it enters a vfmaq_f32 of a dot
// product; nothing adds to it directly, so -ffp-contract cannot fuse it into an FMA either.
//
// n == 1: fused dequantize + dot per row, 4 independent accumulators (16 weights per step), no scratch.
// n > 1:  for each panel of kPanelRows rows and kPanelCols columns, dequantize the panel once into
//         scratch (L1-resident), then run a 4-row x 4-token register-blocked micro-kernel over all tokens.
//
// Every load is bounded by the current group (quantized formats) or the row: vector steps run while a
// whole vector fits, the last few weights of a row are done one by one. Layouts whose groups do not
// split into 8-weight chunks (group_size % 8 != 0) go to the scalar path.
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "edgemoe/kernels.h"
#include "kernel_impls.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the bit-stream/half decoding assumes little-endian");

namespace edgemoe::detail {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Eight consecutive f32 values.
struct F32x8 {
  float32x4_t lo, hi;
};

// ---- decoding (callers guarantee that [c, c + width) lies inside the current group and the row) ----

// (q - z) * s for 8 quantized values: USUBL gives q - z modulo 2^16, which read as int16 is exact.
inline F32x8 dequant8(uint8x8_t q, uint8x8_t zv, float32x4_t sv) {
  const int16x8_t d = vreinterpretq_s16_u16(vsubl_u8(q, zv));
  return {vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(d))), sv),
          vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(d)), sv)};
}

// Unpack 2 nibbles per byte into one byte per weight, in weight order (even index = low nibble).
inline uint8x8x2_t unpack_nibbles(uint8x8_t packed) {
  const uint8x8_t lo = vand_u8(packed, vdup_n_u8(0x0F));
  const uint8x8_t hi = vshr_n_u8(packed, 4);
  return {{vzip1_u8(lo, hi), vzip2_u8(lo, hi)}};
}

// Where lane j of unpack_bits8<B> finds weight j of an 8-weight chunk of B bytes: the 16-bit window of bytes
// (k, k + 1), k = B * j / 8 (table indices 2j, 2j + 1), shifted right by B * j % 8 (a negative vshl count).
template <int B>
struct BitLanes {
  uint8_t idx[16];
  int16_t shift[8];
  constexpr BitLanes() : idx(), shift() {
    for (int j = 0; j < 8; ++j) {
      idx[2 * j] = static_cast<uint8_t>(B * j / 8);
      idx[2 * j + 1] = static_cast<uint8_t>(B * j / 8 + 1);
      shift[j] = static_cast<int16_t>(-(B * j % 8));
    }
  }
};
template <int B>
constexpr BitLanes<B> kBitLanes{};

// Unpack 8 B-bit weights (B = 2, 3) from exactly B bytes at p (weight j in bits [B j, B j + B) of the
// little-endian stream): one byte per weight, in weight order. Reads only the B bytes; the window of the
// last weight may reach byte B, which is the zero padding of the loaded register, then masked off.
template <int B>
inline uint8x8_t unpack_bits8(const uint8_t* p) {
  const uint8x16_t bytes = vreinterpretq_u8_u32(vsetq_lane_u32(load_le<B>(p), vdupq_n_u32(0), 0));
  uint16x8_t w = vreinterpretq_u16_u8(vqtbl1q_u8(bytes, vld1q_u8(kBitLanes<B>.idx)));
  w = vshlq_u16(w, vld1q_s16(kBitLanes<B>.shift));
  return vmovn_u16(vandq_u16(w, vdupq_n_u16((1u << B) - 1)));
}

// The weight row of a quantized matrix. c is always a multiple of 8 here, so a packed chunk of 8 weights is
// exactly kBits bytes starting at byte kBits * c / 8.
template <WDType DT>
struct QuantRow {
  static constexpr int kBits = wdtype_bits(DT);
  static constexpr bool kPacked = kBits < 8;  // U4 / U3 / U2: a little-endian bit stream per row
  const uint8_t* row;

  // q for weights [c, c + 8): reads kBits bytes (packed) or 8 bytes (U8).
  uint8x8_t q8(int64_t c) const {
    if constexpr (kBits == 4) {  // nibbles: the same stream, decoded with two shifts and a zip
      uint32_t packed;
      std::memcpy(&packed, row + c / 2, 4);
      return unpack_nibbles(vreinterpret_u8_u32(vdup_n_u32(packed))).val[0];
    } else if constexpr (kPacked) {
      return unpack_bits8<kBits>(row + (c >> 3) * kBits);
    } else {
      return vld1_u8(row + c);
    }
  }
  // q for weights [c, c + 16): reads 2 * kBits bytes (packed) or 16 bytes (U8).
  uint8x8x2_t q16(int64_t c) const {
    if constexpr (kBits == 4) {
      return unpack_nibbles(vld1_u8(row + c / 2));
    } else if constexpr (kPacked) {
      const uint8_t* p = row + (c >> 3) * kBits;
      return {{unpack_bits8<kBits>(p), unpack_bits8<kBits>(p + kBits)}};
    } else {
      const uint8x16_t q = vld1q_u8(row + c);
      return {{vget_low_u8(q), vget_high_u8(q)}};
    }
  }
  // One weight, for the end of a row.
  float dq1(int64_t c, int z, float s) const {
    int q;
    if constexpr (kPacked)
      q = packed_at(row, c, kBits);
    else
      q = row[c];
    return static_cast<float>(q - z) * s;
  }
};

// One half -> float by the FCVT instruction: exact (a NaN comes out quiet, as with F16C), and inline,
// unlike a call to half_to_float(), which would make the caller spill its vector registers.
inline float f16_to_f32(uint16_t bits) {
  __fp16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

inline F32x8 load_f16x8(const uint16_t* p) {
  const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
  return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
}

inline F32x8 load_f32x8(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }

inline void store8(float* p, F32x8 v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}

// ---- dequantize W[r, c0:c1) into out[0, c1-c0); c0 % 8 == 0, group_size % 8 == 0 ----

template <WDType DT>
void dequant_range(const QMatrix& W, int64_t r, int64_t c0, int64_t c1, float* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(W.data) + r * row_bytes(W);
  if constexpr (DT == WDType::F32) {
    std::memcpy(out, bytes + c0 * 4, static_cast<size_t>(c1 - c0) * 4);
  } else if constexpr (DT == WDType::F16) {
    const uint16_t* h = static_cast<const uint16_t*>(W.data) + r * W.cols;
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) store8(out + (c - c0), load_f16x8(h + c));
    for (; c < c1; ++c) out[c - c0] = f16_to_f32(h[c]);
  } else {
    const QuantRow<DT> q{bytes};
    const int64_t G = num_groups(W), gs = W.group_size;
    for (int64_t g = c0 / gs; g * gs < c1; ++g) {
      const int64_t ge = min64(c1, (g + 1) * gs);
      const float s = f16_to_f32(W.scales[r * G + g]);
      const int z = W.zeros[r * G + g];
      const float32x4_t sv = vdupq_n_f32(s);
      const uint8x8_t zv = vdup_n_u8(static_cast<uint8_t>(z));
      int64_t c = max64(c0, g * gs);
      for (; c + 16 <= ge; c += 16) {
        const uint8x8x2_t qq = q.q16(c);
        store8(out + (c - c0), dequant8(qq.val[0], zv, sv));
        store8(out + (c - c0) + 8, dequant8(qq.val[1], zv, sv));
      }
      for (; c + 8 <= ge; c += 8) store8(out + (c - c0), dequant8(q.q8(c), zv, sv));
      for (; c < ge; ++c) out[c - c0] = q.dq1(c, z, s);  // only at the end of a row
    }
  }
}

// ---- n == 1: fused dequantize + dot of row r with x ----

// The 4 accumulators of a row's dot product; add8(k, ...) feeds accumulator pair k (0 or 1).
struct Acc4 {
  float32x4_t a[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
  void add8(int k, F32x8 w, const float* x) {
    a[2 * k] = vfmaq_f32(a[2 * k], w.lo, vld1q_f32(x));
    a[2 * k + 1] = vfmaq_f32(a[2 * k + 1], w.hi, vld1q_f32(x + 4));
  }
  float sum() const { return vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3]))); }
};

template <WDType DT>
float dot_row(const QMatrix& W, int64_t r, const float* x) {
  const int64_t K = W.cols;
  Acc4 acc;
  float tail = 0.0f;
  if constexpr (DT == WDType::F32 || DT == WDType::F16) {
    auto load8 = [&](int64_t c) {
      if constexpr (DT == WDType::F32)
        return load_f32x8(static_cast<const float*>(W.data) + r * K + c);
      else
        return load_f16x8(static_cast<const uint16_t*>(W.data) + r * K + c);
    };
    auto load1 = [&](int64_t c) {
      if constexpr (DT == WDType::F32)
        return static_cast<const float*>(W.data)[r * K + c];
      else
        return f16_to_f32(static_cast<const uint16_t*>(W.data)[r * K + c]);
    };
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      acc.add8(0, load8(c), x + c);
      acc.add8(1, load8(c + 8), x + c + 8);
    }
    for (; c + 8 <= K; c += 8) acc.add8(0, load8(c), x + c);
    for (; c < K; ++c) tail += load1(c) * x[c];
  } else {
    const QuantRow<DT> q{static_cast<const uint8_t*>(W.data) + r * row_bytes(W)};
    const int64_t G = num_groups(W), gs = W.group_size;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t ge = min64(K, (g + 1) * gs);
      const float s = f16_to_f32(W.scales[r * G + g]);
      const int z = W.zeros[r * G + g];
      const float32x4_t sv = vdupq_n_f32(s);
      const uint8x8_t zv = vdup_n_u8(static_cast<uint8_t>(z));
      int64_t c = g * gs;
      for (; c + 16 <= ge; c += 16) {
        const uint8x8x2_t qq = q.q16(c);
        acc.add8(0, dequant8(qq.val[0], zv, sv), x + c);
        acc.add8(1, dequant8(qq.val[1], zv, sv), x + c + 8);
      }
      for (; c + 8 <= ge; c += 8) acc.add8(0, dequant8(q.q8(c), zv, sv), x + c);
      for (; c < ge; ++c) tail += q.dq1(c, z, s) * x[c];  // only at the end of a row
    }
  }
  return acc.sum() + tail;
}

// ---- n > 1: register-blocked micro-kernel, R rows x T tokens over `len` columns ----
// y[t * ldy + j] += dot(w[j * ldw, +len), x[t * ldx, +len)) for j < R, t < T.
// R x T = 16 accumulators + T x values + 1 weight vector: fits the 32 vector registers.

// The R x T loops are unrolled completely, so that acc[][] lives in registers (indexed at run time, GCC
// keeps the array on the stack and stores it on every iteration).
template <int R, int T>
void micro(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t len, float* y, int64_t ldy) {
  float32x4_t acc[R][T];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[j][t] = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    float32x4_t xv[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) xv[t] = vld1q_f32(x + t * ldx + k);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const float32x4_t wv = vld1q_f32(w + j * ldw + k);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[j][t] = vfmaq_f32(acc[j][t], wv, xv[t]);
    }
  }
  float sum[R][T];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) sum[j][t] = vaddvq_f32(acc[j][t]);
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < T; ++t) {
      float s = sum[j][t];
      for (int64_t kk = k; kk < len; ++kk) s += w[j * ldw + kk] * x[t * ldx + kk];  // the last len % 4
      y[t * ldy + j] += s;
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
constexpr int kMicroRows = 4;
constexpr int kMicroTokens = 4;
constexpr MicroFn kMicro[kMicroRows][kMicroTokens] = {
    {micro<1, 1>, micro<1, 2>, micro<1, 3>, micro<1, 4>},
    {micro<2, 1>, micro<2, 2>, micro<2, 3>, micro<2, 4>},
    {micro<3, 1>, micro<3, 2>, micro<3, 3>, micro<3, 4>},
    {micro<4, 1>, micro<4, 2>, micro<4, 3>, micro<4, 4>},
};

template <WDType DT>
void gemm_panels(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy, int64_t r0,
                 int64_t r1, float* scratch) {
  const int64_t K = W.cols;
  for (int64_t rb = r0; rb < r1; rb += kPanelRows) {
    const int64_t nr = min64(kPanelRows, r1 - rb);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < nr; ++j) Y[i * ldy + rb + j] = W.bias ? W.bias[rb + j] : 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kPanelCols) {
      const int64_t kl = min64(kPanelCols, K - k0);
      const float* w;
      int64_t ldw;
      if constexpr (DT == WDType::F32) {  // already floats: no copy
        w = static_cast<const float*>(W.data) + rb * K + k0;
        ldw = K;
      } else {  // each weight of the panel is dequantized exactly once per call
        for (int64_t j = 0; j < nr; ++j) dequant_range<DT>(W, rb + j, k0, k0 + kl, scratch + j * kPanelCols);
        w = scratch;
        ldw = kPanelCols;
      }
      for (int64_t i = 0; i < n; i += kMicroTokens) {
        const int64_t nt = min64(kMicroTokens, n - i);
        for (int64_t j = 0; j < nr; j += kMicroRows) {
          const int64_t nj = min64(kMicroRows, nr - j);
          kMicro[nj - 1][nt - 1](w + j * ldw, ldw, X + i * ldx + k0, ldx, kl, Y + i * ldy + rb + j, ldy);
        }
      }
    }
  }
}

template <WDType DT>
void gemm_rows_t(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy, int64_t r0,
                 int64_t r1, float* scratch) {
  if (n == 1) {
    for (int64_t r = r0; r < r1; ++r) Y[r] = dot_row<DT>(W, r, X) + (W.bias ? W.bias[r] : 0.0f);
  } else {
    gemm_panels<DT>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
  }
}

bool vectorizable(const QMatrix& W) {
  return !wdtype_quantized(W.dtype) || W.group_size % 8 == 0;  // 8-weight chunks never straddle a group
}

void gemm_rows_neon(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
                    int64_t r0, int64_t r1, float* scratch) {
  if (n <= 0 || r0 >= r1) return;
  if (!vectorizable(W)) return gemm_rows_scalar(W, X, n, ldx, Y, ldy, r0, r1, scratch);
  switch (W.dtype) {
    case WDType::F32: return gemm_rows_t<WDType::F32>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
    case WDType::F16: return gemm_rows_t<WDType::F16>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
    case WDType::U8: return gemm_rows_t<WDType::U8>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
    case WDType::U4: return gemm_rows_t<WDType::U4>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
    case WDType::U3: return gemm_rows_t<WDType::U3>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
    case WDType::U2: return gemm_rows_t<WDType::U2>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
  }
}

void dequant_row_neon(const QMatrix& W, int64_t r, float* out) {
  if (!vectorizable(W)) return dequant_row_scalar(W, r, out);
  switch (W.dtype) {
    case WDType::F32: return dequant_range<WDType::F32>(W, r, 0, W.cols, out);
    case WDType::F16: return dequant_range<WDType::F16>(W, r, 0, W.cols, out);
    case WDType::U8: return dequant_range<WDType::U8>(W, r, 0, W.cols, out);
    case WDType::U4: return dequant_range<WDType::U4>(W, r, 0, W.cols, out);
    case WDType::U3: return dequant_range<WDType::U3>(W, r, 0, W.cols, out);
    case WDType::U2: return dequant_range<WDType::U2>(W, r, 0, W.cols, out);
  }
}

}  // namespace

const KernelImpl kNeonImpl = {"neon", gemm_rows_neon, dequant_row_neon};

}  // namespace edgemoe::detail
