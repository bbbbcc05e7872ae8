// Micro-benchmark of gemm_rows, single-threaded, on one expert FFN's shapes:
//   w_in [2I, H] and w_out [H, I], default H=4096, I=14336 (Mixtral), int4 group 64.
// Usage: bench_kernels [dtype=u4|u3|u2|u8|f16|f32] [group_size=64] [H=4096] [I=14336] [tokens=1,64] [impl]
// Reports the best thread CPU time of each matrix product (robust on a shared machine) and the weight bytes
// streamed per second (data + scales + zeros; the weights do not fit in the LLC, so T=1 streams from DRAM).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "edgemoe/kernels.h"

using namespace edgemoe;

namespace {

struct Matrix {
  QMatrix W;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  std::vector<uint8_t> zeros;
  size_t bytes = 0;
};

Matrix make(WDType dt, int64_t rows, int64_t cols, int64_t gs, std::mt19937& rng) {
  Matrix m;
  m.W.dtype = dt;
  m.W.rows = rows;
  m.W.cols = cols;
  const int64_t rb = (wdtype_bits(dt) * cols + 7) / 8;
  m.data.resize(static_cast<size_t>(rows * rb));
  for (auto& b : m.data) b = static_cast<uint8_t>(rng());
  if (dt == WDType::F16)  // keep halves finite and small: exponent field 8..22
    for (size_t i = 1; i < m.data.size(); i += 2) m.data[i] = static_cast<uint8_t>(0x20 + m.data[i] % 0x38);
  if (dt == WDType::F32)
    for (size_t i = 3; i < m.data.size(); i += 4) m.data[i] = static_cast<uint8_t>(0x3C + m.data[i] % 2);
  m.bytes = m.data.size();
  if (wdtype_quantized(dt)) {
    const int64_t G = (cols + gs - 1) / gs;
    m.W.group_size = gs;
    m.scales.assign(static_cast<size_t>(rows * G), float_to_half(0.01f));
    m.zeros.resize(static_cast<size_t>(rows * G));
    for (auto& z : m.zeros) z = static_cast<uint8_t>(rng() % (1u << wdtype_bits(dt)));
    m.W.scales = m.scales.data();
    m.W.zeros = m.zeros.data();
    m.bytes += m.scales.size() * 2 + m.zeros.size();
  }
  m.W.data = m.data.data();
  return m;
}

double thread_ms() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

double best_ms(const KernelImpl& impl, const Matrix& m, int64_t T, int reps) {
  std::vector<float> X(static_cast<size_t>(T * m.W.cols), 0.25f), Y(static_cast<size_t>(T * m.W.rows));
  std::vector<float> scratch(gemm_scratch_floats(m.W));
  double best = 1e30;
  for (int i = 0; i < reps + 1; ++i) {
    const double t0 = thread_ms();
    impl.gemm_rows(m.W, X.data(), T, m.W.cols, Y.data(), m.W.rows, 0, m.W.rows, scratch.data());
    const double t1 = thread_ms();
    if (i > 0) best = std::min(best, t1 - t0);  // the first run is a warm-up
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dts = argc > 1 ? argv[1] : "u4";
  const int64_t gs = argc > 2 ? std::atoll(argv[2]) : 64;
  const int64_t H = argc > 3 ? std::atoll(argv[3]) : 4096;
  const int64_t I = argc > 4 ? std::atoll(argv[4]) : 14336;
  const std::string tok = argc > 5 ? argv[5] : "1,64";
  const char* impl_name = argc > 6 ? argv[6] : kernel_path();
  const WDType dt = dts == "f32"   ? WDType::F32
                   : dts == "f16" ? WDType::F16
                   : dts == "u8"  ? WDType::U8
                   : dts == "u3"  ? WDType::U3
                   : dts == "u2"  ? WDType::U2
                                  : WDType::U4;
  const KernelImpl* impl = find_kernel_impl(impl_name);
  if (!impl) {
    std::fprintf(stderr, "implementation %s not available\n", impl_name);
    return 2;
  }
  std::mt19937 rng(1);
  const Matrix w_in = make(dt, 2 * I, H, gs, rng), w_out = make(dt, H, I, gs, rng);
  std::printf("impl=%s dtype=%s group=%lld H=%lld I=%lld, weight bytes: w_in %.1f MB, w_out %.1f MB\n", impl->name,
              dts.c_str(), static_cast<long long>(gs), static_cast<long long>(H), static_cast<long long>(I),
              w_in.bytes / 1e6, w_out.bytes / 1e6);
  std::stringstream ss(tok);
  for (std::string t; std::getline(ss, t, ',');) {
    const int64_t T = std::atoll(t.c_str());
    const int reps = T <= 8 ? 9 : 3;
    const double a = best_ms(*impl, w_in, T, reps), b = best_ms(*impl, w_out, T, reps);
    std::printf("T=%-4lld w_in %8.2f ms (%6.2f GB/s)  w_out %8.2f ms (%6.2f GB/s)  expert %8.2f ms  %7.1f GFLOP/s\n",
                static_cast<long long>(T), a, w_in.bytes / a / 1e6, b, w_out.bytes / b / 1e6, a + b,
                2.0 * T * (w_in.W.rows * H + w_out.W.rows * I) / (a + b) / 1e6);
  }
  return 0;
}
