// Quantized expert kernels: fused dequantize + GEMV/GEMM over one weight matrix of an expert.
// Formats are specified in docs/bundle-format.md ("Quantization formats"). The dequantized value of
// every weight is bit-identical to the numpy reference (edgemoe_ort/quant): (float(q) - float(z)) * s.
#pragma once
#include <cstddef>
#include <cstdint>

namespace edgemoe {

enum class WDType : uint8_t { F32, F16, U8, U4, U3, U2 };

// Bits per stored weight; the packed types (U4, U3, U2: bits < 8) hold each row as a little-endian bit
// stream, weight c in bits [bits * c, bits * c + bits), every row starting on a byte.
constexpr int wdtype_bits(WDType dt) {
  switch (dt) {
    case WDType::F32: return 32;
    case WDType::F16: return 16;
    case WDType::U8: return 8;
    case WDType::U4: return 4;
    case WDType::U3: return 3;
    case WDType::U2: return 2;
  }
  return 0;
}
constexpr bool wdtype_quantized(WDType dt) { return dt != WDType::F32 && dt != WDType::F16; }

// A read-only view of one weight matrix W [rows, cols] (row-major, nn.Linear layout) inside a blob.
struct QMatrix {
  WDType dtype = WDType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t group_size = 0;            // U8/U4/U3/U2 only: weights per (row, group); G = ceil(cols / group_size)
  const void* data = nullptr;        // F32: float, F16: uint16 half bits, U8: uint8, U4/U3/U2: packed rows of
                                     // ceil(bits * cols / 8) bytes (see wdtype_bits)
  const uint16_t* scales = nullptr;  // quantized types: [rows, G] f16 bits
  const uint8_t* zeros = nullptr;    // quantized types: [rows, G], each <= 2^bits - 1
  const float* bias = nullptr;       // optional [rows]
};

// Y[i, r] = sum_c W[r, c] * X[i, c] (+ bias[r]) for tokens i in [0, n) and rows r in [r0, r1).
// X: n rows with stride ldx floats; Y: n rows with stride ldy floats. Each weight row is dequantized once
// per call whatever n is. `scratch` must hold at least `gemm_scratch_floats(W)` floats (may be unused).
// Thread-safe: disjoint [r0, r1) ranges may run concurrently.
void gemm_rows(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
               int64_t r0, int64_t r1, float* scratch);
size_t gemm_scratch_floats(const QMatrix& W);

// Dequantize row r of W into out[0, cols). For tests and the numpy-parity check.
void dequant_row(const QMatrix& W, int64_t r, float* out);

// IEEE half <-> float (exact for every half value; float->half rounds to nearest even).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// Which implementation gemm_rows dispatches to on this machine: "avx2", "neon" or "scalar".
// Overridable for tests with the environment variable EDGEMOE_KERNEL=scalar (read once, at the first call).
const char* kernel_path();

// ---- Implementations, for tests and benchmarks (production code calls the dispatching functions above) ----
// Every implementation computes bit-identical dequantized weights; gemm results differ only by the f32
// summation order. `gemm_scratch_floats` is large enough for all of them.
struct KernelImpl {
  const char* name;  // "scalar", "avx2", "neon"
  void (*gemm_rows)(const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y, int64_t ldy,
                    int64_t r0, int64_t r1, float* scratch);
  void (*dequant_row)(const QMatrix& W, int64_t r, float* out);
};
// The implementation called `name` if it is compiled in and this CPU supports it, else nullptr.
const KernelImpl* find_kernel_impl(const char* name);

}  // namespace edgemoe
