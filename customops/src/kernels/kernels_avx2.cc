// AVX2 + FMA + F16C kernels. Compiled with -mavx2 -mfma -mf16c on x86-64 only and called through the
// dispatch table of kernels.cc after a runtime CPU check, so nothing here may be reachable otherwise:
// all helpers have internal linkage, and no std:: templates are instantiated in this TU (a COMDAT copy
// compiled for AVX2 could be picked by the linker for the portable code).
//
// Dequantization is bit-identical to the scalar path and to numpy: d = q - z in int32 (exact), one
// cvtepi32_ps (exact) and one f32 multiply by the f16 scale (exact conversion via F16C). The product is
// materialized before it enters an FMA of a dot product, so no contraction can change it.
//
// n <= 8: fused dequantize + dot per row for all n tokens at once (registers only, no scratch).
// n > 8:  for each block of 16 rows x 256 columns, dequantize the block once into scratch (L1-resident),
//         transpose it, then run a 16-row x 6-token outer-product micro-kernel over all tokens.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "edgemoe/kernels.h"
#include "kernel_impls.h"

namespace edgemoe::detail {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- decoding 8 consecutive weights (all loads bounded: callers guarantee c + 8 <= group/row end) ----

// Quantized formats: the weight row's bytes and the current group's zero point / scale.
template <WDType DT>
struct QuantRow {
  const uint8_t* row;

  static constexpr int kBits = wdtype_bits(DT);
  static constexpr bool kPacked = kBits < 8;  // U4 / U3 / U2: a little-endian bit stream per row

  // The kBits bytes at p (exactly those) in the low 8 * kBits bits of every 32-bit lane, by broadcast loads
  // (no trip through a general register): U4 one dword, U2 one word (the lane's high half repeats it, bits
  // a mask drops), U3 a word and a byte blended (bits 24-31 repeat byte 2, likewise dropped).
  static __m256i broadcast_chunk(const uint8_t* p) {
    if constexpr (kBits == 4) {
      return _mm256_set1_epi32(static_cast<int32_t>(load_le<4>(p)));
    } else {
      const __m256i w = _mm256_broadcastw_epi16(_mm_loadu_si16(p));
      if constexpr (kBits == 2) return w;
      else return _mm256_blend_epi16(w, _mm256_set1_epi8(static_cast<char>(p[2])), 0xAA);
    }
  }

  // q - z for weights [c, c+8) as int32. c is a multiple of 8, so a packed chunk is exactly kBits bytes
  // starting at byte kBits * c / 8: read just those (never past the row), broadcast, shift lane j right by
  // j * kBits, mask.
  __m256i diff8(int64_t c, __m256i zv) const {
    if constexpr (kPacked) {
      const __m256i shifts =
          _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits, 7 * kBits);
      const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(broadcast_chunk(row + (c >> 3) * kBits), shifts),
                                         _mm256_set1_epi32((1 << kBits) - 1));
      return _mm256_sub_epi32(q, zv);
    } else {
      int64_t bytes;
      std::memcpy(&bytes, row + c, 8);
      return _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), zv);
    }
  }
  __m256 dq8(int64_t c, __m256i zv, __m256 sv) const {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(diff8(c, zv)), sv);
  }
  float dq1(int64_t c, int z, float s) const {
    int q;
    if constexpr (kPacked)
      q = packed_at(row, c, kBits);
    else
      q = row[c];
    return static_cast<float>(q - z) * s;
  }
};

inline float load_scale(const QMatrix& W, int64_t idx) { return _cvtsh_ss(W.scales[idx]); }

inline __m256 load_f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i_u*>(p)));
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
    for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(out + (c - c0), load_f16x8(h + c));
    for (; c < c1; ++c) out[c - c0] = _cvtsh_ss(h[c]);
  } else {
    const QuantRow<DT> q{bytes};
    const int64_t G = num_groups(W), gs = W.group_size;
    for (int64_t g = c0 / gs; g * gs < c1; ++g) {
      const int64_t ge = min64(c1, (g + 1) * gs);
      const float s = load_scale(W, r * G + g);
      const int z = W.zeros[r * G + g];
      const __m256 sv = _mm256_set1_ps(s);
      const __m256i zv = _mm256_set1_epi32(z);
      int64_t c = max64(c0, g * gs);
      for (; c + 8 <= ge; c += 8) _mm256_storeu_ps(out + (c - c0), q.dq8(c, zv, sv));
      for (; c < ge; ++c) out[c - c0] = q.dq1(c, z, s);  // only at the end of a row
    }
  }
}

// ---- n <= kFusedTokens: fused dequantize + dot of row r with T tokens, no scratch ----
// Each 8-weight vector is dequantized once in registers and used for all T tokens. U chunks per step give
// T * U independent accumulators (U = 4 for one token, 2 up to 4 tokens, 1 up to 8: at most 8 accumulators,
// so that with the weight vector, the scale/zero broadcasts and the shift constants all fit in 16 registers).

constexpr int kFusedTokens = 8;

// acc[t][u] += w8(c + 8u) * x[t, c + 8u ...] over the 8-aligned part of [c, end); returns the first column
// not consumed (end - c < 8 left over).
template <int T, int U, class W8>
int64_t fused_span(W8&& w8, int64_t c, int64_t end, const float* x, int64_t ldx, __m256 (&acc)[T][U]) {
  for (; c + 8 * U <= end; c += 8 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256 w = w8(c + 8 * u);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[t][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + c + 8 * u), acc[t][u]);
    }
  }
  for (; c + 8 <= end; c += 8) {
    const __m256 w = w8(c);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + c), acc[t][0]);
  }
  return c;
}

// out[t] = dot(W[r, :], x[t * ldx, +cols)) for t < T.
template <WDType DT, int T>
void fused_rows(const QMatrix& W, int64_t r, const float* x, int64_t ldx, float* out) {
  constexpr int U = T == 1 ? 4 : T <= 4 ? 2 : 1;
  const int64_t K = W.cols;
  __m256 acc[T][U];
  float tail[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    tail[t] = 0.0f;
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  }
  if constexpr (DT == WDType::F32 || DT == WDType::F16) {
    const float* wf = static_cast<const float*>(W.data) + r * K;     // F32 only
    const uint16_t* wh = static_cast<const uint16_t*>(W.data) + r * K;  // F16 only
    auto w8 = [&](int64_t c) {
      if constexpr (DT == WDType::F32)
        return _mm256_loadu_ps(wf + c);
      else
        return load_f16x8(wh + c);
    };
    for (int64_t c = fused_span<T, U>(w8, 0, K, x, ldx, acc); c < K; ++c) {
      const float w = DT == WDType::F32 ? wf[c] : _cvtsh_ss(wh[c]);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) tail[t] += w * x[t * ldx + c];
    }
  } else {
    const QuantRow<DT> q{static_cast<const uint8_t*>(W.data) + r * row_bytes(W)};
    const int64_t G = num_groups(W), gs = W.group_size;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t ge = min64(K, (g + 1) * gs);
      const float s = load_scale(W, r * G + g);
      const int z = W.zeros[r * G + g];
      const __m256 sv = _mm256_set1_ps(s);
      const __m256i zv = _mm256_set1_epi32(z);
      auto w8 = [&](int64_t c) { return q.dq8(c, zv, sv); };
      for (int64_t c = fused_span<T, U>(w8, g * gs, ge, x, ldx, acc); c < ge; ++c) {  // only at a row end
        const float w = q.dq1(c, z, s);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) tail[t] += w * x[t * ldx + c];
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[t][0];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
    out[t] = hsum(sum) + tail[t];
  }
}

template <WDType DT, int T>
void gemm_fused(const QMatrix& W, const float* X, int64_t ldx, float* Y, int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float out[T];
    fused_rows<DT, T>(W, r, X, ldx, out);
    const float b = W.bias ? W.bias[r] : 0.0f;
    for (int t = 0; t < T; ++t) Y[t * ldy + r] = out[t] + b;
  }
}

// ---- n > 1: panels of dequantized weights, outer-product micro-kernel ----
//
// For each block of kPanelRows (16) rows and each chunk of kPanelCols columns: dequantize the block once
// (row-major, `rows`), transpose it into `panel` [k][16], then for every group of up to 6 tokens run a
// 16-row x T-token micro-kernel: per column k, two panel vectors times one broadcast x value per token,
// 12 independent FMA accumulators, no horizontal sums. Partial sums are added to Y chunk by chunk.

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block.
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

constexpr int kMicroTokens = 6;
static_assert(kPanelRows == 16, "the micro-kernel covers 16 rows with two 8-float vectors");
static_assert(kPanelCols % 8 == 0, "panel chunks are transposed in 8 x 8 blocks");

// y[t * ldy + j] += sum_k panel[k * 16 + j] * x[t * ldx + k] for t < T, j < nr (rows >= nr are padding).
template <int T>
void micro(const float* panel, const float* x, int64_t ldx, int64_t len, float* y, int64_t ldy, int64_t nr) {
  __m256 lo[T], hi[T];
#pragma GCC unroll 6
  for (int t = 0; t < T; ++t) lo[t] = hi[t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + k);
      lo[t] = _mm256_fmadd_ps(w0, xb, lo[t]);
      hi[t] = _mm256_fmadd_ps(w1, xb, hi[t]);
    }
  }
#pragma GCC unroll 6  // fully unrolled everywhere, so that lo/hi stay in registers
  for (int t = 0; t < T; ++t) {
    float* yt = y + t * ldy;
    if (nr == 16) {
      _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), lo[t]));
      _mm256_storeu_ps(yt + 8, _mm256_add_ps(_mm256_loadu_ps(yt + 8), hi[t]));
    } else {  // partial row block: never touch y beyond nr
      float sums[16];
      _mm256_storeu_ps(sums, lo[t]);
      _mm256_storeu_ps(sums + 8, hi[t]);
      for (int64_t j = 0; j < nr; ++j) yt[j] += sums[j];
    }
  }
}

using MicroFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, int64_t);
constexpr MicroFn kMicro[kMicroTokens] = {micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

template <WDType DT>
void gemm_panels(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy, int64_t r0,
                 int64_t r1, float* scratch) {
  const int64_t K = W.cols;
  float* rows = scratch;                             // [kPanelRows][kPanelCols], row-major
  float* panel = scratch + kPanelRows * kPanelCols;  // [kPanelCols][kPanelRows]
  for (int64_t rb = r0; rb < r1; rb += kPanelRows) {
    const int64_t nr = min64(kPanelRows, r1 - rb);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < nr; ++j) Y[i * ldy + rb + j] = W.bias ? W.bias[rb + j] : 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kPanelCols) {
      const int64_t kl = min64(kPanelCols, K - k0);
      const int64_t kl8 = (kl + 7) / 8 * 8;
      // Each weight of the block is dequantized exactly once per call; padding rows/columns are zero.
      for (int64_t j = 0; j < kPanelRows; ++j) {
        float* dst = rows + j * kPanelCols;
        int64_t c = 0;
        if (j < nr) {
          dequant_range<DT>(W, rb + j, k0, k0 + kl, dst);
          c = kl;
        }
        for (; c < kl8; ++c) dst[c] = 0.0f;
      }
      for (int64_t c = 0; c < kl8; c += 8) {
        transpose8x8(rows + c, kPanelCols, panel + c * kPanelRows, kPanelRows);
        transpose8x8(rows + 8 * kPanelCols + c, kPanelCols, panel + c * kPanelRows + 8, kPanelRows);
      }
      for (int64_t i = 0; i < n; i += kMicroTokens) {
        const int64_t nt = min64(kMicroTokens, n - i);
        kMicro[nt - 1](panel, X + i * ldx + k0, ldx, kl, Y + i * ldy + rb, ldy, nr);
      }
    }
  }
}

template <WDType DT>
void gemm_rows_t(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy, int64_t r0,
                 int64_t r1, float* scratch) {
  static_assert(kFusedTokens == 8, "one case per fused token count");
  switch (n) {
    case 1: return gemm_fused<DT, 1>(W, X, ldx, Y, ldy, r0, r1);
    case 2: return gemm_fused<DT, 2>(W, X, ldx, Y, ldy, r0, r1);
    case 3: return gemm_fused<DT, 3>(W, X, ldx, Y, ldy, r0, r1);
    case 4: return gemm_fused<DT, 4>(W, X, ldx, Y, ldy, r0, r1);
    case 5: return gemm_fused<DT, 5>(W, X, ldx, Y, ldy, r0, r1);
    case 6: return gemm_fused<DT, 6>(W, X, ldx, Y, ldy, r0, r1);
    case 7: return gemm_fused<DT, 7>(W, X, ldx, Y, ldy, r0, r1);
    case 8: return gemm_fused<DT, 8>(W, X, ldx, Y, ldy, r0, r1);
    default: return gemm_panels<DT>(W, X, n, ldx, Y, ldy, r0, r1, scratch);
  }
}

bool vectorizable(const QMatrix& W) {
  return !wdtype_quantized(W.dtype) || W.group_size % 8 == 0;  // 8-wide chunks never straddle a group
}

void gemm_rows_avx2(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
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

void dequant_row_avx2(const QMatrix& W, int64_t r, float* out) {
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

const KernelImpl kAvx2Impl = {"avx2", gemm_rows_avx2, dequant_row_avx2};

}  // namespace edgemoe::detail
