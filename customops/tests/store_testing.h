// Shared by the C++ unit tests (each test is its own executable that includes this once): CHECK macros,
// allocation fault injection, a tiny fp32 bundle writer. No ONNX Runtime needed (ASan/UBSan: make test-asan).
#pragma once
#include <fcntl.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "edgemoe/manifest.h"
#include "edgemoe/moe.h"
#include "edgemoe/policy.h"
#include "edgemoe/stats.h"
#include "edgemoe/store.h"
#include "edgemoe/throttle.h"

namespace fs = std::filesystem;
using namespace edgemoe;
using json = nlohmann::json;

// Allocation fault injection: when t_fail_countdown > 0, the countdown-th next operator new on this thread
// throws std::bad_alloc (other threads, e.g. the store's I/O threads, are unaffected).
static thread_local long t_fail_countdown = -1;
// The largest single operator new of this thread since it was last reset (bounds of what a reader allocates).
static thread_local std::size_t t_largest_alloc = 0;
void* operator new(std::size_t n) {
  if (n > t_largest_alloc) t_largest_alloc = n;
  if (t_fail_countdown > 0 && --t_fail_countdown == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// (GCC sees new-expressions paired with free() once these are inlined: they are, by construction.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (t_fail_countdown > 0 && --t_fail_countdown == 0) return nullptr;
  return std::malloc(n == 0 ? 1 : n);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

static int g_failures = 0;
#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                               \
    }                                                                             \
  } while (0)
#define CHECK_EQ(a, b)                                                                                 \
  do {                                                                                                 \
    const auto va = (a);                                                                               \
    const auto vb = (b);                                                                               \
    if (!(va == vb)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, __LINE__, #a, \
                   #b, static_cast<long long>(va), static_cast<long long>(vb));                        \
      ++g_failures;                                                                                    \
    }                                                                                                  \
  } while (0)

// Runs f, expects an edgemoe::Error whose message contains every needle.
static void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles, int line) {
  try {
    f();
    std::fprintf(stderr, "line %d: expected an error, got none\n", line);
    ++g_failures;
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      if (msg.find(n) == std::string::npos) {
        std::fprintf(stderr, "line %d: error message lacks '%s': %s\n", line, n.c_str(), msg.c_str());
        ++g_failures;
      }
    }
  }
}
#define EXPECT_ERROR(stmt, ...) expect_error([&] { stmt; }, {__VA_ARGS__}, __LINE__)

// --- a tiny fp32 bundle writer ---------------------------------------------------------------------------
struct LayerSpec {
  int64_t experts, hidden, inter;
};

struct TestBundle {
  fs::path dir;
  json manifest;
  std::vector<std::vector<std::vector<float>>> w_in, w_out;  // [layer][expert] row-major
  std::vector<LayerSpec> layers;

  void write_manifest() const { std::ofstream(dir / "manifest.json") << manifest.dump(1); }
  uint64_t largest() const {
    uint64_t m = 0;
    for (const auto& r : manifest["experts"]) m = std::max<uint64_t>(m, r["length"].get<uint64_t>());
    return m;
  }
  uint64_t length(int l, int e) const {
    for (const auto& r : manifest["experts"])
      if (r["layer"] == l && r["expert"] == e) return r["length"].get<uint64_t>();
    return 0;
  }
};

static uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

static TestBundle make_bundle(const fs::path& dir, const std::vector<LayerSpec>& layers, uint32_t seed = 1) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  TestBundle b;
  b.dir = dir;
  b.layers = layers;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint8_t> store;
  json jl = json::array(), je = json::array();
  b.w_in.resize(layers.size());
  b.w_out.resize(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    jl.push_back({{"layer", l}, {"num_experts", L.experts}, {"top_k", 2}, {"hidden", L.hidden},
                  {"intermediate", L.inter}, {"gated", true}, {"activation", "silu"}});
    for (int64_t e = 0; e < L.experts; ++e) {
      std::vector<float> wi(static_cast<size_t>(2 * L.inter * L.hidden)), wo(static_cast<size_t>(L.hidden * L.inter));
      for (auto& x : wi) x = nd(rng) / std::sqrt(static_cast<float>(L.hidden));
      for (auto& x : wo) x = nd(rng) / std::sqrt(static_cast<float>(L.inter));
      const uint64_t off_in = 0, nb_in = wi.size() * 4;
      const uint64_t off_out = align_up(nb_in, 64), nb_out = wo.size() * 4;
      const uint64_t size = off_out + nb_out, length = align_up(size, 4096);
      const uint64_t offset = store.size();
      store.resize(offset + length, 0);
      std::memcpy(&store[offset + off_in], wi.data(), nb_in);
      std::memcpy(&store[offset + off_out], wo.data(), nb_out);
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx",
                    static_cast<unsigned long long>(XXH3_64bits(&store[offset], size)));
      je.push_back({{"layer", l}, {"expert", e}, {"offset", offset}, {"length", length}, {"size", size},
                    {"checksum", hex},
                    {"format", {{"dtype", "fp32"}, {"group_size", 0}, {"scheme", "none"}}},
                    {"tensors",
                     {{"w_in", {{"offset", off_in}, {"nbytes", nb_in}, {"dtype", "f32"}, {"shape", {2 * L.inter, L.hidden}}}},
                      {"w_out", {{"offset", off_out}, {"nbytes", nb_out}, {"dtype", "f32"}, {"shape", {L.hidden, L.inter}}}}}}});
      b.w_in[l].push_back(std::move(wi));
      b.w_out[l].push_back(std::move(wo));
    }
  }
  std::ofstream(dir / "experts.bin", std::ios::binary).write(reinterpret_cast<const char*>(store.data()),
                                                             static_cast<std::streamsize>(store.size()));
  b.manifest = {{"format", "edgemoe-bundle"}, {"format_version", 1}, {"created_by", "test_store"},
                {"model", {{"family", "synthetic"}, {"config", json::object()}}},
                {"graphs", json::object()}, {"tokenizer", nullptr},
                {"store", {{"file", "experts.bin"}, {"size", store.size()}, {"alignment", 4096}, {"checksum", "xxh3_64"}}},
                {"layers", jl}, {"experts", je}};
  b.write_manifest();
  return b;
}

static StoreOptions opts(uint64_t budget, const std::string& policy = "lru", IoMode io = IoMode::Buffered) {
  StoreOptions o;
  o.budget_bytes = budget;
  o.policy = policy;
  o.io_mode = io;
  o.io_threads = 2;
  static int n = 0;
  o.store_id = "test-" + std::to_string(++n);
  return o;
}

static bool blob_ok(ExpertStore::Pin& p) {
  const uint8_t* d = p.wait();
  return XXH3_64bits(d, p.record().size) == p.record().checksum;
}

static fs::path g_root;


// Runs the tests in a fresh folder under the working directory (a real disk: O_DIRECT), or under /tmp if it
// cannot be made there; prints one line per test; returns the process exit code.
static int run_tests(const char* name, const std::vector<std::pair<const char*, void (*)()>>& tests) {
  std::string tmpl = std::string("/tmp/edgemoe_") + name + "_XXXXXX";
  fs::path base = fs::current_path() / (std::string(name) + "_tmp");
  std::error_code ec;
  fs::remove_all(base, ec);
  g_root = fs::create_directories(base, ec) ? base : fs::path(mkdtemp(tmpl.data()));
  for (const auto& [test, fn] : tests) {
    const int before = g_failures;
    try {
      fn();
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "%s: unexpected exception: %s\n", test, ex.what());
      ++g_failures;
    }
    std::printf("%-36s %s\n", test, g_failures == before ? "ok" : "FAILED");
  }
  fs::remove_all(g_root, ec);
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
