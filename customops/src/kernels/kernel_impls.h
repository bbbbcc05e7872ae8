// Internal to the kernels: the per-ISA implementations behind the dispatch table of kernels.cc.
// Adding an ISA (e.g. kernels_neon.cc): define its KernelImpl there, declare it here under its
// EDGEMOE_HAVE_* macro, and list it in find_kernel_impl() / the preference order in kernels.cc.
#pragma once
#include <cstdint>
#include <cstring>

#include "edgemoe/kernels.h"

namespace edgemoe::detail {

// Portable reference path (kernels.cc). Also the fallback of the SIMD paths for layouts they do not
// vectorize (group sizes that are not a multiple of 8).
void gemm_rows_scalar(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
                      int64_t r0, int64_t r1, float* scratch);
void dequant_row_scalar(const QMatrix& W, int64_t r, float* out);

// Scratch of the SIMD paths for n > 1: a block of kPanelRows rows x kPanelCols columns, dequantized
// row-major, and the same block transposed (column-major) for the micro-kernel. kernels.cc takes the max.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kPanelCols = 256;  // multiple of 8
constexpr int64_t kSimdScratchFloats = 2 * kPanelRows * kPanelCols;

// Helpers have internal linkage on purpose: kernels_avx2.cc is compiled with -mavx2, and a shared
// (COMDAT) inline copy emitted there could be picked by the linker for the portable code too.

static inline int64_t num_groups(const QMatrix& W) { return W.cols > 0 ? (W.cols - 1) / W.group_size + 1 : 0; }
static inline int64_t row_bytes(const QMatrix& W) { return (wdtype_bits(W.dtype) * W.cols + 7) / 8; }

// Weight c of a packed row (bits < 8): bits [bits * c, bits * c + bits) of the row's little-endian bit
// stream. Reads the next byte only when the weight straddles it (so never past the row's last byte).
static inline int packed_at(const uint8_t* row, int64_t c, int bits) {
  const int64_t bit = bits * c;
  const int shift = static_cast<int>(bit & 7);
  unsigned v = row[bit >> 3];
  if (shift + bits > 8) v |= static_cast<unsigned>(row[(bit >> 3) + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

// The N (2, 3 or 4) bytes at p as a little-endian integer, reading exactly those bytes. Built from whole
// loads of a local (not by memcpy into part of a zeroed word, which makes the compiler store and reload it:
// a store-forwarding stall per chunk).
template <int N>
static inline uint32_t load_le(const uint8_t* p) {
  static_assert(N >= 2 && N <= 4, "2 to 4 bytes");
  if constexpr (N == 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  } else {
    uint16_t lo;
    std::memcpy(&lo, p, 2);
    if constexpr (N == 2) return lo;
    else return lo | static_cast<uint32_t>(p[2]) << 16;
  }
}

#if defined(EDGEMOE_HAVE_AVX2)
extern const KernelImpl kAvx2Impl;  // kernels_avx2.cc; only call if the CPU has AVX2 + FMA + F16C
#endif
#if defined(EDGEMOE_HAVE_NEON)
extern const KernelImpl kNeonImpl;  // kernels_neon.cc
#endif

}  // namespace edgemoe::detail
