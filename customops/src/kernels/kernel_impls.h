// Internal to the kernels: the per-ISA implementations behind the dispatch table of kernels.cc.
// Adding an ISA (e.g. kernels_neon.cc): define its KernelImpl there, declare it here under its
// EDGEMOE_HAVE_* macro, and list it in find_kernel_impl() / the preference order in kernels.cc.
#pragma once
#include <cstdint>

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
static inline int64_t row_bytes(const QMatrix& W) {
  switch (W.dtype) {
    case WDType::F32: return W.cols * 4;
    case WDType::F16: return W.cols * 2;
    case WDType::U8: return W.cols;
    case WDType::U4: return (W.cols + 1) / 2;
  }
  return 0;
}

#if defined(EDGEMOE_HAVE_AVX2)
extern const KernelImpl kAvx2Impl;  // kernels_avx2.cc; only call if the CPU has AVX2 + FMA + F16C
#endif
#if defined(EDGEMOE_HAVE_NEON)
extern const KernelImpl kNeonImpl;  // kernels_neon.cc
#endif

}  // namespace edgemoe::detail
