// Tests of the quantized expert kernels (customops/include/edgemoe/kernels.h).
// Every implementation available on this machine ("scalar"; "avx2" on x86-64 CPUs that have it; "neon" on
// aarch64) is checked against an independent reference written here: dequantization bit-exact, gemm_rows
// against a double-precision dot product. All buffers are sized exactly, so ASan catches any out-of-bounds
// read.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "edgemoe/formats.h"
#include "edgemoe/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

using namespace edgemoe;

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    if (g_failed <= 30) std::printf("FAIL: %s\n", what.c_str());
  }
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Independent half decoding: the textbook formula, in double, then rounded (exactly representable).
float ref_half_to_float(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int man = h & 0x3FF;
  if (exp == 31) return man ? std::nanf("") : sign * INFINITY;
  if (exp == 0) return static_cast<float>(sign * std::ldexp(static_cast<double>(man), -24));
  return static_cast<float>(sign * std::ldexp(1.0 + man / 1024.0, exp - 15));
}

const char* dtype_name(WDType dt) {
  switch (dt) {
    case WDType::F32: return "f32";
    case WDType::F16: return "f16";
    case WDType::U8: return "u8";
    case WDType::U4: return "u4";
    case WDType::U3: return "u3";
    case WDType::U2: return "u2";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------------
// half conversion

#if defined(__x86_64__)
__attribute__((target("f16c"))) uint16_t hw_float_to_half(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hw_half_to_float(uint16_t h) { return _cvtsh_ss(h); }
bool have_hw_half() { return __builtin_cpu_supports("f16c"); }
#define EDGEMOE_TEST_HW_HALF "F16C"
#elif defined(__aarch64__)
// __fp16 conversions compile to FCVT (base AArch64), rounding to nearest even.
uint16_t hw_float_to_half(float f) {
  const __fp16 h = static_cast<__fp16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float hw_half_to_float(uint16_t u) {
  __fp16 h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}
bool have_hw_half() { return true; }
#define EDGEMOE_TEST_HW_HALF "FCVT"
#endif

void test_half() {
  // Every half round-trips exactly (payload of nans included) and decodes like the textbook formula.
  int bad_rt = 0, bad_ref = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hh = static_cast<uint16_t>(h);
    const float f = half_to_float(hh);
    if (float_to_half(f) != hh) ++bad_rt;
    const float r = ref_half_to_float(hh);
    if (std::isnan(r) ? !std::isnan(f) : bits(f) != bits(r)) ++bad_ref;
  }
  check(bad_rt == 0, "half round trip on all 65536 values: " + std::to_string(bad_rt) + " mismatches");
  check(bad_ref == 0, "half_to_float vs reference formula: " + std::to_string(bad_ref) + " mismatches");

  // float -> half rounding: exact ties (midpoints of consecutive halves) must round to even.
  int bad_tie = 0;
  for (uint32_t h = 0; h < 0x7C00; ++h) {  // positive finite halves and their successor
    const double a = ref_half_to_float(static_cast<uint16_t>(h));
    const double b = h + 1 < 0x7C00 ? ref_half_to_float(static_cast<uint16_t>(h + 1)) : 65536.0;
    const float mid = static_cast<float>((a + b) / 2);  // exact in f32
    const uint16_t want = (h & 1) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
    if (float_to_half(mid) != want || float_to_half(-mid) != (want | 0x8000)) ++bad_tie;
    if (float_to_half(std::nextafter(mid, 0.0f)) != h) ++bad_tie;
    if (h + 1 < 0x7C00 && float_to_half(std::nextafter(mid, INFINITY)) != h + 1) ++bad_tie;
  }
  check(bad_tie == 0, "float_to_half round-to-nearest-even at midpoints: " + std::to_string(bad_tie));
  check(float_to_half(1e10f) == 0x7C00 && float_to_half(-INFINITY) == 0xFC00 &&
            float_to_half(65519.996f) == 0x7BFF && float_to_half(65520.0f) == 0x7C00 &&
            float_to_half(1e-10f) == 0 && float_to_half(-0.0f) == 0x8000 &&
            (float_to_half(std::nanf("")) & 0x7FFF) > 0x7C00,
        "float_to_half specials (overflow, inf, underflow, -0, nan)");

#if defined(EDGEMOE_TEST_HW_HALF)
  if (have_hw_half()) {  // the hardware converter as a second, independent reference
    int bad = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
      const float a = half_to_float(static_cast<uint16_t>(h)), b = hw_half_to_float(static_cast<uint16_t>(h));
      if (std::isnan(b) ? !std::isnan(a) : bits(a) != bits(b)) ++bad;
    }
    std::mt19937 rng(7);
    for (int i = 0; i < 2000000; ++i) {
      const uint32_t u = rng();
      // bias towards the half range (exponents 100..145) half of the time
      const float f = (i & 1) ? from_bits(u) : from_bits((u & 0x807FFFFFu) | ((100u + (u >> 23) % 46) << 23));
      const uint16_t a = float_to_half(f), b = hw_float_to_half(f);
      if (std::isnan(f) ? (a & 0x7FFF) <= 0x7C00 : a != b) ++bad;
    }
    check(bad == 0, std::string("half conversion vs ") + EDGEMOE_TEST_HW_HALF +
                       " hardware (all halves + 2M floats): " + std::to_string(bad));
  }
#endif
}

// ---------------------------------------------------------------------------------------------------
// random matrices, exactly sized buffers

struct TestMatrix {
  QMatrix W;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  std::vector<uint8_t> zeros;
  std::vector<float> bias;
};

uint16_t random_finite_half(std::mt19937& rng) {
  for (;;) {
    const uint16_t h = static_cast<uint16_t>(rng());
    if (((h >> 10) & 0x1F) != 0x1F) return h;
  }
}

// A random f16 scale: mostly ordinary magnitudes, sometimes subnormal or large, sometimes negative.
uint16_t random_scale(std::mt19937& rng) {
  const uint32_t kind = rng() % 16;
  if (kind == 0) return static_cast<uint16_t>(1 + rng() % 0x3FF);             // subnormal
  if (kind == 1) return static_cast<uint16_t>(0x7000 + rng() % 0x0BFF);       // large (< 65504)
  if (kind == 2) return 0x3C00;                                               // 1.0 (all-zero group)
  const float s = std::ldexp(1.0f + (rng() % 1000) / 1000.0f, -static_cast<int>(rng() % 12)) * 0.05f;
  return static_cast<uint16_t>(float_to_half(s) | ((kind == 3) ? 0x8000 : 0));
}

TestMatrix make_matrix(WDType dt, int64_t rows, int64_t cols, int64_t gs, bool with_bias, std::mt19937& rng) {
  TestMatrix m;
  m.W.dtype = dt;
  m.W.rows = rows;
  m.W.cols = cols;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  switch (dt) {
    case WDType::F32: {
      std::vector<float> w(static_cast<size_t>(rows * cols));
      for (float& v : w) v = normal(rng);
      m.data.resize(w.size() * 4);
      std::memcpy(m.data.data(), w.data(), m.data.size());
      break;
    }
    case WDType::F16: {
      std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
      for (uint16_t& v : w) v = (rng() % 4 == 0) ? random_finite_half(rng) : float_to_half(normal(rng));
      m.data.resize(w.size() * 2);
      std::memcpy(m.data.data(), w.data(), m.data.size());
      break;
    }
    case WDType::U8:
    case WDType::U4:
    case WDType::U3:
    case WDType::U2: {
      const int b = wdtype_bits(dt), qmax = (1 << b) - 1;
      const int64_t G = (cols + gs - 1) / gs;
      m.W.group_size = gs;
      m.scales.resize(static_cast<size_t>(rows * G));
      m.zeros.resize(static_cast<size_t>(rows * G));
      for (uint16_t& s : m.scales) s = random_scale(rng);
      for (uint8_t& z : m.zeros) z = static_cast<uint8_t>(rng() % (qmax + 1));
      // About one group in 8 is what the quantizer makes of an all-zero group: s = 1, z = 0, every q = 0.
      std::vector<bool> zero_group(m.zeros.size());
      for (size_t i = 0; i < zero_group.size(); ++i)
        if (rng() % 8 == 0) {
          zero_group[i] = true;
          m.scales[i] = 0x3C00;
          m.zeros[i] = 0;
        }
      // Rows of ceil(b * cols / 8) bytes; weight c in bits [b c, b c + b) of the row, written bit by bit.
      const int64_t rb = (b * cols + 7) / 8;
      m.data.assign(static_cast<size_t>(rows * rb), 0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const uint32_t q = zero_group[static_cast<size_t>(r * G + c / gs)] ? 0u : rng() % (qmax + 1);
          for (int k = 0; k < b; ++k)
            if ((q >> k) & 1u) {
              const int64_t bit = b * c + k;
              m.data[static_cast<size_t>(r * rb + bit / 8)] |= static_cast<uint8_t>(1u << (bit % 8));
            }
        }
      m.W.scales = m.scales.data();
      m.W.zeros = m.zeros.data();
      break;
    }
  }
  m.W.data = m.data.data();
  if (with_bias) {
    m.bias.resize(static_cast<size_t>(rows));
    for (float& b : m.bias) b = normal(rng);
    m.W.bias = m.bias.data();
  }
  return m;
}

// Independent reference dequantization: numpy's expression (float(q) - float(z)) * s, element by element.
std::vector<float> ref_dequant(const TestMatrix& m, int64_t r) {
  const QMatrix& W = m.W;
  std::vector<float> out(static_cast<size_t>(W.cols));
  for (int64_t c = 0; c < W.cols; ++c) {
    float w = 0;
    if (W.dtype == WDType::F32) {
      std::memcpy(&w, m.data.data() + 4 * (r * W.cols + c), 4);
    } else if (W.dtype == WDType::F16) {
      uint16_t h;
      std::memcpy(&h, m.data.data() + 2 * (r * W.cols + c), 2);
      w = ref_half_to_float(h);
    } else {
      const int64_t G = (W.cols + W.group_size - 1) / W.group_size, g = c / W.group_size;
      // q: bits [b c, b c + b) of the row's little-endian bit stream, gathered bit by bit.
      const int b = wdtype_bits(W.dtype);
      const int64_t rb = (b * W.cols + 7) / 8;
      int q = 0;
      for (int k = 0; k < b; ++k) {
        const int64_t bit = b * c + k;
        q |= ((m.data[static_cast<size_t>(r * rb + bit / 8)] >> (bit % 8)) & 1) << k;
      }
      const float qf = static_cast<float>(q);
      const float zf = static_cast<float>(m.zeros[static_cast<size_t>(r * G + g)]);
      const float s = ref_half_to_float(m.scales[static_cast<size_t>(r * G + g)]);
      const float d = qf - zf;
      w = d * s;
    }
    out[static_cast<size_t>(c)] = w;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------

struct Shape {
  int64_t rows, cols;
};

std::string case_name(const KernelImpl& impl, const TestMatrix& m) {
  return std::string(impl.name) + " " + dtype_name(m.W.dtype) + " [" + std::to_string(m.W.rows) + "x" +
         std::to_string(m.W.cols) + "] g" + std::to_string(m.W.group_size);
}

void test_dequant(const KernelImpl& impl, const TestMatrix& m) {
  bool ok = true;
  std::vector<float> out;
  for (int64_t r = 0; r < m.W.rows && ok; ++r) {
    out.assign(static_cast<size_t>(m.W.cols), -1.0f);
    impl.dequant_row(m.W, r, out.data());
    const std::vector<float> ref = ref_dequant(m, r);
    for (int64_t c = 0; c < m.W.cols; ++c)
      if (bits(out[static_cast<size_t>(c)]) != bits(ref[static_cast<size_t>(c)])) {
        std::printf("  %s row %lld col %lld: got %a want %a\n", case_name(impl, m).c_str(),
                    static_cast<long long>(r), static_cast<long long>(c), out[static_cast<size_t>(c)],
                    ref[static_cast<size_t>(c)]);
        ok = false;
        break;
      }
  }
  check(ok, "dequant_row bit-exact: " + case_name(impl, m));
}

double g_max_rel_err = 0;

void test_gemm(const KernelImpl& impl, const TestMatrix& m, int64_t n, int64_t r0, int64_t r1, std::mt19937& rng) {
  const QMatrix& W = m.W;
  const int64_t ldx = W.cols + static_cast<int64_t>(rng() % 3);  // sometimes padded
  const int64_t ldy = W.rows + static_cast<int64_t>(rng() % 3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> X(static_cast<size_t>((n - 1) * ldx + W.cols));  // exact size: no slack to over-read
  for (float& v : X) v = normal(rng);
  const float sentinel = 12345.0f;
  std::vector<float> Y(static_cast<size_t>((n - 1) * ldy + W.rows), sentinel);
  std::vector<float> scratch(gemm_scratch_floats(W), std::nanf(""));
  impl.gemm_rows(W, X.data(), n, ldx, Y.data(), ldy, r0, r1, scratch.data());

  bool ok = true;
  double worst = 0;
  for (int64_t r = 0; r < W.rows && ok; ++r) {
    const bool inside = r >= r0 && r < r1;
    const std::vector<float> w = inside ? ref_dequant(m, r) : std::vector<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float got = Y[static_cast<size_t>(i * ldy + r)];
      if (!inside) {
        if (bits(got) != bits(sentinel)) ok = false;
        continue;
      }
      double ref = W.bias ? W.bias[r] : 0.0, mag = W.bias ? std::fabs(W.bias[r]) : 0.0;
      for (int64_t c = 0; c < W.cols; ++c) {
        const double p = static_cast<double>(w[static_cast<size_t>(c)]) * X[static_cast<size_t>(i * ldx + c)];
        ref += p;
        mag += std::fabs(p);
      }
      const double rel = std::fabs(got - ref) / (mag > 0 ? mag : 1.0);
      if (!(rel <= 1e-5)) {
        std::printf("  %s n=%lld row %lld token %lld: got %.9g want %.9g (rel %.3g)\n", case_name(impl, m).c_str(),
                    static_cast<long long>(n), static_cast<long long>(r), static_cast<long long>(i), got, ref, rel);
        ok = false;
        break;
      }
      if (rel > worst) worst = rel;
    }
  }
  // padding columns of Y between rows must be untouched too
  for (int64_t i = 0; i + 1 < n && ok; ++i)
    for (int64_t r = W.rows; r < ldy; ++r)
      if (bits(Y[static_cast<size_t>(i * ldy + r)]) != bits(sentinel)) ok = false;
  if (worst > g_max_rel_err) g_max_rel_err = worst;
  check(ok, "gemm_rows: " + case_name(impl, m) + " n=" + std::to_string(n) + " rows [" + std::to_string(r0) +
                "," + std::to_string(r1) + ")" + (W.bias ? " +bias" : ""));
}

// The format table and the kernels agree on bits; tensor_nbytes follows rows * ceil(bits * cols / 8).
void test_format_table() {
  for (const FormatTraits& f : formats()) {
    check(wdtype_bits(f.weight) == f.bits && tensor_dtype_bits(f.tensor_dtype) == f.bits &&
              wdtype_quantized(f.weight) == f.grouped && find_format(f.name) == &f,
          std::string("format table row ") + f.name);
  }
  check(format_names() == "fp32, fp16, int8, int4, int3, int2", "format_names(): " + format_names());
  check(tensor_nbytes("u4", {3, 7}) == 12 && tensor_nbytes("u3", {3, 7}) == 9 && tensor_nbytes("u2", {3, 7}) == 6 &&
            tensor_nbytes("u3", {2, 8}) == 6 && tensor_nbytes("u3", {1, 19}) == 8 && tensor_nbytes("u2", {4, 1}) == 4 &&
            tensor_nbytes("u8", {3, 7}) == 21 && tensor_nbytes("f16", {3, 7}) == 42 && tensor_nbytes("f32", {5}) == 20,
        "tensor_nbytes of every dtype");
  bool threw = false;
  try {
    tensor_nbytes("u3", {5});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "tensor_nbytes: a 1-D packed tensor is refused");
  threw = false;
  try {
    tensor_nbytes("u5", {2, 2});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "tensor_nbytes: an unknown dtype is refused");
}

// The packing rule on hand-made bytes (docs/bundle-format.md, "Packing"): one row of 19 weights per packed
// width, every implementation, s = 1 and z = 0 so the dequantized value is q itself. 19 columns with group 8:
// two full 8-weight SIMD chunks and a 3-weight tail, the last byte's unused high bits zero.
void test_packed_layout(const std::vector<const KernelImpl*>& impls) {
  struct Case {
    WDType dt;
    std::vector<uint8_t> bytes;  // ceil(b * 19 / 8) bytes
    std::vector<int> q;          // the 19 weights they hold
  };
  const std::vector<int> q2 = {0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 2, 2, 3, 3, 0, 0, 2, 3, 1};
  const std::vector<int> q3 = {0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0, 5, 2, 7};
  const std::vector<int> q4 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 9, 3, 12};
  const Case cases[] = {
      // u2: 4 weights per byte, weight 0 in bits 0-1: 0b11100100 = 0xE4 holds (0, 1, 2, 3).
      {WDType::U2, {0xE4, 0x1B, 0xA5, 0x0F, 0x1E}, q2},
      // u3: 8 weights in 3 bytes, weights 2 and 5 straddle a byte: (0..7) = 0x88 0xC6 0xFA.
      {WDType::U3, {0x88, 0xC6, 0xFA, 0x77, 0x39, 0x05, 0xD5, 0x01}, q3},
      // u4: the even weight in the low nibble.
      {WDType::U4, {0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE, 0x39, 0x0C}, q4},
  };
  for (const Case& k : cases) {
    const int64_t cols = 19, gs = 8, G = 3;
    std::vector<uint16_t> scales(G, 0x3C00);
    std::vector<uint8_t> zeros(G, 0);
    QMatrix W;
    W.dtype = k.dt;
    W.rows = 1;
    W.cols = cols;
    W.group_size = gs;
    W.data = k.bytes.data();
    W.scales = scales.data();
    W.zeros = zeros.data();
    check(static_cast<int64_t>(k.bytes.size()) == (wdtype_bits(k.dt) * cols + 7) / 8,
          std::string("packed layout case size: ") + dtype_name(k.dt));
    for (const KernelImpl* impl : impls) {
      std::vector<float> out(cols, -1.0f);
      impl->dequant_row(W, 0, out.data());
      bool ok = true;
      for (int64_t c = 0; c < cols; ++c) ok = ok && out[static_cast<size_t>(c)] == static_cast<float>(k.q[static_cast<size_t>(c)]);
      check(ok, std::string("packed layout by hand: ") + impl->name + " " + dtype_name(k.dt));
    }
  }
}

}  // namespace

int main() {
  test_half();

  std::vector<const KernelImpl*> impls;
  for (const char* name : {"scalar", "avx2", "neon"})
    if (const KernelImpl* impl = find_kernel_impl(name)) impls.push_back(impl);

  // Dispatch: the default is the best implementation; EDGEMOE_KERNEL=scalar forces the portable one.
  const char* env = std::getenv("EDGEMOE_KERNEL");
  const bool forced_scalar = env && std::strcmp(env, "scalar") == 0;
  const std::string expect = forced_scalar ? "scalar" : impls.back()->name;
  check(kernel_path() == expect, std::string("kernel_path() = ") + kernel_path() + ", expected " + expect);
  check(find_kernel_impl("no-such-isa") == nullptr, "find_kernel_impl(unknown) == nullptr");

  std::printf("kernel_path: %s; testing:", kernel_path());
  for (const KernelImpl* impl : impls) std::printf(" %s", impl->name);
  std::printf("\n");

  std::mt19937 rng(12345);
  const Shape shapes[] = {{5, 64}, {9, 100}, {13, 257}, {3, 1}, {4, 7}, {16, 513}, {11, 1100}, {2, 2048}};
  test_format_table();
  test_packed_layout(impls);

  const WDType dtypes[] = {WDType::F32, WDType::F16, WDType::U8, WDType::U4, WDType::U3, WDType::U2};
  for (WDType dt : dtypes) {
    const bool quant = wdtype_quantized(dt);
    // 32/64/128 are the real ones; 20 and 7 exercise the generic (non-multiple-of-8) fallback.
    const std::vector<int64_t> group_sizes = quant ? std::vector<int64_t>{32, 64, 128, 20, 7} : std::vector<int64_t>{0};
    for (const Shape& sh : shapes)
      for (int64_t gs : group_sizes) {
        for (int with_bias = 0; with_bias < 2; ++with_bias) {
          const TestMatrix m = make_matrix(dt, sh.rows, sh.cols, gs, with_bias != 0, rng);
          for (const KernelImpl* impl : impls) {
            if (!with_bias) test_dequant(*impl, m);
            for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 64}) {
              test_gemm(*impl, m, n, 0, sh.rows, rng);
              if (sh.rows > 2) test_gemm(*impl, m, n, 1, sh.rows - 1, rng);
              if (sh.rows > 9) test_gemm(*impl, m, n, 3, 9, rng);  // sub-range not aligned to panels
            }
          }
          // The dispatching entry points give exactly what the active implementation gives.
          const KernelImpl* active = find_kernel_impl(kernel_path());
          const int64_t n = 7;
          std::vector<float> X(static_cast<size_t>(n * sh.cols), 0.5f), Ya(static_cast<size_t>(n * sh.rows)),
              Yb(Ya.size()), scratch(gemm_scratch_floats(m.W));
          for (size_t k = 0; k < X.size(); ++k) X[k] = static_cast<float>(k % 17) - 8.0f;
          gemm_rows(m.W, X.data(), n, sh.cols, Ya.data(), sh.rows, 0, sh.rows, scratch.data());
          active->gemm_rows(m.W, X.data(), n, sh.cols, Yb.data(), sh.rows, 0, sh.rows, scratch.data());
          check(std::memcmp(Ya.data(), Yb.data(), Ya.size() * 4) == 0, "gemm_rows dispatch == " +
                                                                            std::string(active->name));
        }
      }
  }

  std::printf("max relative error of gemm_rows vs double reference: %.3g (tolerance 1e-5)\n", g_max_rel_err);
  std::printf("kernels: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
