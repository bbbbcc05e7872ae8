// Low-bit twins (bundle format v2) and the miss-precision rule: the manifest's twin records and their checks,
// the store holding both copies of an expert, run_moe's dynamic choice (twin, skip, renormalized weights,
// counters), the prefetcher reading the copy its prediction implies, and the thresholds derived from a
// profile. Real files, real reads (store_testing.h).
#include "edgemoe/kernels.h"
#include "edgemoe/precision.h"
#include "edgemoe/prefetcher.h"
#include "edgemoe/profile.h"
#include "store_testing.h"

namespace {

// Twin weights as the kernels see them: fp16-rounded copies of the primaries, [layer][expert].
struct Twins {
  std::vector<std::vector<std::vector<float>>> w_in, w_out;
};

std::vector<float> halved(const std::vector<float>& w) {
  std::vector<float> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = half_to_float(float_to_half(w[i]));
  return out;
}

// Appends an fp16 twin of every expert in `which` (all if empty) to the store and the manifest (version 2).
Twins add_twins(TestBundle& b, const std::vector<std::pair<int, int>>& which = {}) {
  Twins t;
  t.w_in.resize(b.layers.size());
  t.w_out.resize(b.layers.size());
  std::fstream f(b.dir / "experts.bin", std::ios::binary | std::ios::in | std::ios::out | std::ios::ate);
  uint64_t size_now = static_cast<uint64_t>(f.tellp());
  for (size_t l = 0; l < b.layers.size(); ++l) {
    const auto& L = b.layers[l];
    t.w_in[l].resize(static_cast<size_t>(L.experts));
    t.w_out[l].resize(static_cast<size_t>(L.experts));
    for (int64_t e = 0; e < L.experts; ++e) {
      const bool wanted = which.empty() || std::find(which.begin(), which.end(),
                                                     std::make_pair(static_cast<int>(l), static_cast<int>(e))) != which.end();
      if (!wanted) continue;
      std::vector<uint8_t> blob;
      auto put = [&](const std::vector<float>& w) {
        const uint64_t off = align_up(blob.size(), 64);
        blob.resize(off + w.size() * 2, 0);
        for (size_t i = 0; i < w.size(); ++i) {
          const uint16_t h = float_to_half(w[i]);
          std::memcpy(&blob[off + 2 * i], &h, 2);
        }
        return off;
      };
      const auto& wi = b.w_in[l][static_cast<size_t>(e)];
      const auto& wo = b.w_out[l][static_cast<size_t>(e)];
      const uint64_t off_in = put(wi), off_out = put(wo);
      const uint64_t size = blob.size(), length = align_up(size, 4096);
      blob.resize(length, 0);
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits(blob.data(), size)));
      f.seekp(static_cast<std::streamoff>(size_now));
      f.write(reinterpret_cast<const char*>(blob.data()), static_cast<std::streamsize>(length));
      b.manifest["experts"].push_back(
          {{"layer", l}, {"expert", e}, {"variant", 1}, {"offset", size_now}, {"length", length}, {"size", size},
           {"checksum", hex},
           {"format", {{"dtype", "fp16"}, {"group_size", 0}, {"scheme", "none"}}},
           {"tensors",
            {{"w_in", {{"offset", off_in}, {"nbytes", wi.size() * 2}, {"dtype", "f16"}, {"shape", {2 * L.inter, L.hidden}}}},
             {"w_out", {{"offset", off_out}, {"nbytes", wo.size() * 2}, {"dtype", "f16"}, {"shape", {L.hidden, L.inter}}}}}}});
      size_now += length;
      t.w_in[l][static_cast<size_t>(e)] = halved(wi);
      t.w_out[l][static_cast<size_t>(e)] = halved(wo);
    }
  }
  f.close();
  b.manifest["store"]["size"] = size_now;
  b.manifest["format_version"] = 2;
  b.write_manifest();
  return t;
}

// y = sum over slots of scale_t * w * expert(x), expert weights chosen per (token, slot) by `pick`
// (nullptr = skipped), in double.
using Pick = std::function<std::pair<const std::vector<float>*, const std::vector<float>*>(int64_t t, int64_t k)>;
std::vector<double> reference(const LayerSpec& L, const std::vector<float>& X, const std::vector<float>& w,
                              int64_t T, int64_t K, const Pick& pick) {
  const int64_t H = L.hidden, I = L.inter;
  std::vector<double> Y(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    double all = 0, kept = 0;
    for (int64_t k = 0; k < K; ++k) {
      all += w[static_cast<size_t>(t * K + k)];
      if (pick(t, k).first) kept += w[static_cast<size_t>(t * K + k)];
    }
    for (int64_t k = 0; k < K; ++k) {
      const auto [wi, wo] = pick(t, k);
      if (!wi) continue;
      std::vector<double> h(static_cast<size_t>(I));
      for (int64_t j = 0; j < I; ++j) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += static_cast<double>((*wi)[static_cast<size_t>(j * H + c)]) * X[static_cast<size_t>(t * H + c)];
          u += static_cast<double>((*wi)[static_cast<size_t>((I + j) * H + c)]) * X[static_cast<size_t>(t * H + c)];
        }
        h[static_cast<size_t>(j)] = g / (1.0 + std::exp(-g)) * u;
      }
      const double wk = w[static_cast<size_t>(t * K + k)] * (all / kept);
      for (int64_t r = 0; r < H; ++r) {
        double y = 0;
        for (int64_t j = 0; j < I; ++j) y += static_cast<double>((*wo)[static_cast<size_t>(r * I + j)]) * h[static_cast<size_t>(j)];
        Y[static_cast<size_t>(t * H + r)] += wk * y;
      }
    }
  }
  return Y;
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(got[i] - want[i]));
    ref = std::max(ref, std::abs(want[i]));
  }
  return err / std::max(ref, 1e-30);
}

}  // namespace

static void test_manifest_twins() {
  TestBundle b = make_bundle(g_root / "mt", {{4, 16, 24}});
  const uint64_t primaries = b.manifest["store"]["size"].get<uint64_t>();
  add_twins(b, {{0, 1}, {0, 3}});
  const Manifest m = load_manifest(b.dir);
  CHECK(m.has_twins());
  CHECK_EQ(m.format_version, 2);
  CHECK(m.twin(0, 1) != nullptr && m.twin(0, 3) != nullptr && m.twin(0, 0) == nullptr);
  CHECK(m.twin(0, 1)->dtype == ExpertDType::FP16 && m.twin(0, 1)->variant == kTwin);
  CHECK_EQ(m.primary_bytes(), primaries);
  CHECK_EQ(m.num_experts(), size_t{4});
  CHECK_EQ(m.num_records(), size_t{8});
  CHECK_EQ(m.record_index(0, 1, kTwin), size_t{5});
  CHECK(m.record(0, 3, kTwin).offset == m.twin(0, 3)->offset);
  EXPECT_ERROR(m.record(0, 0, kTwin), "layer 0 expert 0", "no such twin");

  const json good = b.manifest;
  auto broken = [&](const std::function<void(json&)>& f) {
    b.manifest = good;
    f(b.manifest);
    b.write_manifest();
  };
  broken([](json& j) { j["format_version"] = 1; });  // twins need version 2
  EXPECT_ERROR(load_manifest(b.dir), "layer 0 expert 1", "variant", "no variant in format_version 1");
  broken([](json& j) { j["experts"][4]["variant"] = 2; });
  EXPECT_ERROR(load_manifest(b.dir), "variant", "one of 0, 1", "found 2");
  broken([](json& j) { j["experts"].push_back(j["experts"][5]); });
  EXPECT_ERROR(load_manifest(b.dir), "layer 0 expert 3", "duplicate twin record");
  broken([](json& j) {  // an fp32 twin record holding fp16 bytes: refused by the record rules (the bits rule
    j["experts"][4]["format"]["dtype"] = "fp32";  // has its own test below)
    j["experts"][4]["tensors"]["w_in"]["dtype"] = "f32";
  });
  EXPECT_ERROR(load_manifest(b.dir), "layer 0 expert 1", "tensors.w_in.nbytes");
  broken([](json& j) { j["experts"][4]["offset"] = j["experts"][1]["offset"]; });
  EXPECT_ERROR(load_manifest(b.dir), "layer 0 expert 1", "blob of the twin overlaps the blob of layer 0 expert 1");
  broken([](json& j) { j["format_version"] = 3; });
  EXPECT_ERROR(load_manifest(b.dir), "format_version", "expected 1 or 2", "found 3");
  b.manifest = good;
  b.write_manifest();
}

static void test_twin_bits_must_be_fewer() {
  // An fp32 bundle whose twin is fp32 too (same bits): refused by the bits rule, not by a tensor check.
  TestBundle b = make_bundle(g_root / "tb", {{2, 16, 24}});
  json twin = b.manifest["experts"][0];
  twin["variant"] = 1;
  twin["offset"] = b.manifest["store"]["size"];
  {
    std::fstream f(b.dir / "experts.bin", std::ios::binary | std::ios::in | std::ios::out);
    std::vector<char> blob(twin["length"].get<size_t>());
    f.seekg(0);
    f.read(blob.data(), static_cast<std::streamsize>(blob.size()));
    f.seekp(0, std::ios::end);
    f.write(blob.data(), static_cast<std::streamsize>(blob.size()));
  }
  b.manifest["experts"].push_back(twin);
  b.manifest["store"]["size"] = b.manifest["store"]["size"].get<uint64_t>() + twin["length"].get<uint64_t>();
  b.manifest["format_version"] = 2;
  b.write_manifest();
  EXPECT_ERROR(load_manifest(b.dir), "layer 0 expert 0", "experts[2].format.dtype",
               "a twin has fewer bits than its primary: twin fp32 (32 bits) beside primary fp32 (32 bits)");
}

static void test_store_holds_both_copies() {
  TestBundle b = make_bundle(g_root / "st", {{4, 16, 24}});
  add_twins(b);
  const Manifest m = load_manifest(b.dir);
  const uint64_t big = m.record(0, 2).length, small = m.record(0, 2, kTwin).length;
  CHECK(small < big);
  ExpertStore s(load_manifest(b.dir), opts(big + small));
  {
    ExpertStore::Pin hi = s.acquire(0, 2);
    ExpertStore::Pin lo = s.acquire(0, 2, kTwin);
    CHECK(blob_ok(hi) && blob_ok(lo));
    CHECK(lo.record().variant == kTwin && hi.record().variant == kPrimary);
    CHECK(s.is_resident(0, 2, kPrimary) && s.is_resident(0, 2, kTwin));
  }
  CHECK_EQ(s.resident_bytes(), big + small);
  {  // the twin of another expert evicts within the budget
    ExpertStore::Pin lo = s.acquire(0, 3, kTwin);
    CHECK(blob_ok(lo));
  }
  CHECK(s.stats()->peak_resident_bytes.load() <= big + small);
  CHECK_EQ(s.stats()->num_experts, uint64_t{4});
  {  // reading a primary drops its resident twin (never used again while the primary is resident)
    ExpertStore s2(load_manifest(b.dir), opts(0));
    { ExpertStore::Pin lo = s2.acquire(0, 1, kTwin); lo.wait(); }
    CHECK(s2.is_resident(0, 1, kTwin));
    { ExpertStore::Pin hi = s2.acquire(0, 1); hi.wait(); }
    CHECK(s2.is_resident(0, 1, kPrimary) && !s2.is_resident(0, 1, kTwin));
    CHECK_EQ(s2.resident_bytes(), big);
    // ... but not a pinned one
    ExpertStore::Pin lo = s2.acquire(0, 2, kTwin);
    lo.wait();
    { ExpertStore::Pin hi = s2.acquire(0, 2); hi.wait(); }
    CHECK(s2.is_resident(0, 2, kTwin));
  }
  {  // a primary read that cannot get its bytes evicts nothing, its twin included
    ExpertStore s3(load_manifest(b.dir), opts(big + small));
    { ExpertStore::Pin lo = s3.acquire(0, 1, kTwin); lo.wait(); }
    ExpertStore::Pin held = s3.acquire(0, 2);  // pinned: the only other way to make room
    held.wait();
    CHECK(!s3.try_acquire(0, 1).has_value());
    CHECK(!s3.prefetch(0, 1, PrefetchHint{1, 1.0f}));
    CHECK(s3.is_resident(0, 1, kTwin));
    CHECK_EQ(s3.stats()->evictions.load(), uint64_t{0});
  }
  EXPECT_ERROR(s.acquire(0, 9, kTwin), "no such expert");
}

static void test_run_moe_dynamic() {
  TestBundle b = make_bundle(g_root / "dyn", {{8, 32, 48}});
  const Twins tw = add_twins(b);
  const LayerSpec& L = b.layers[0];
  const int64_t H = L.hidden, K = 2, T = 8;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> X(static_cast<size_t>(T * H));
  for (auto& x : X) x = nd(rng);
  // Token t: slot 0 expert t % 4 (s = 0: high), slot 1 expert 4 + t % 4: experts 4, 5 with weight 0.3 (s = 0.7:
  // the twin), 6, 7 with 0.05 (s = 0.95: skipped).
  std::vector<int64_t> idx(static_cast<size_t>(T * K));
  std::vector<float> w(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    idx[static_cast<size_t>(t * K)] = t % 4;
    idx[static_cast<size_t>(t * K + 1)] = 4 + t % 4;
    const bool skip = t % 4 >= 2;
    w[static_cast<size_t>(t * K)] = skip ? 0.95f : 0.7f;
    w[static_cast<size_t>(t * K + 1)] = skip ? 0.05f : 0.3f;
  }
  MoeAttrs a;
  a.layer = 0;
  a.num_experts = 8;
  a.top_k = K;
  PrecisionOptions dyn;
  dyn.mode = MissPrecision::Dynamic;
  std::vector<float> Y(X.size()), Yexact(X.size()), Yv1(X.size());

  {  // exact: the primaries, bit for bit what a bundle without twins computes
    ExpertStore s(load_manifest(b.dir), opts(0));
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Yexact.data(), serial_parallel_for());
    CHECK_EQ(s.stats()->layers[0].uses_high.load(), uint64_t{16});
    CHECK_EQ(s.stats()->layers[0].uses_low.load(), uint64_t{0});
  }
  {
    TestBundle v1 = make_bundle(g_root / "dyn_v1", {{8, 32, 48}});  // the same seed: the same primaries
    ExpertStore s(load_manifest(v1.dir), opts(0));
    std::vector<float> Yplain(X.size());
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Yplain.data(), serial_parallel_for());
    for (size_t i = 0; i < Y.size(); ++i) CHECK(Yplain[i] == Yexact[i]);  // exact ignores twins, bit for bit
    ExpertStore s2(load_manifest(v1.dir), opts(0));
    run_moe(s2, a, X.data(), idx.data(), w.data(), T, H, K, Yv1.data(), serial_parallel_for(), {}, dyn);
  }
  {
    ExpertStore s(load_manifest(b.dir), opts(0));
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y.data(), serial_parallel_for(), {}, dyn);
    const LayerCounters& c = s.stats()->layers[0];
    CHECK_EQ(c.uses_high.load(), uint64_t{8});
    CHECK_EQ(c.uses_low.load(), uint64_t{4});
    CHECK_EQ(c.uses_skipped.load(), uint64_t{4});
    CHECK(s.is_resident(0, 4, kTwin) && !s.is_resident(0, 4, kPrimary));
    CHECK(!s.is_resident(0, 6, kTwin) && !s.is_resident(0, 6, kPrimary));  // skipped: never read
  }
  const auto want = reference(L, X, w, T, K, [&](int64_t t, int64_t k) -> std::pair<const std::vector<float>*, const std::vector<float>*> {
    const int64_t e = idx[static_cast<size_t>(t * K + k)];
    if (k == 0) return {&b.w_in[0][static_cast<size_t>(e)], &b.w_out[0][static_cast<size_t>(e)]};
    if (e >= 6) return {nullptr, nullptr};
    return {&tw.w_in[0][static_cast<size_t>(e)], &tw.w_out[0][static_cast<size_t>(e)]};
  });
  CHECK(rel_err(Y, want) <= 1e-5);
  bool differs = false;
  for (size_t i = 0; i < Y.size(); ++i) differs |= Y[i] != Yexact[i];
  CHECK(differs);
  // Without twins, dynamic reads the primary where a twin would do and still skips above T2.
  const auto want_v1 = reference(L, X, w, T, K, [&](int64_t t, int64_t k) -> std::pair<const std::vector<float>*, const std::vector<float>*> {
    const int64_t e = idx[static_cast<size_t>(t * K + k)];
    if (k == 1 && e >= 6) return {nullptr, nullptr};
    return {&b.w_in[0][static_cast<size_t>(e)], &b.w_out[0][static_cast<size_t>(e)]};
  });
  CHECK(rel_err(Yv1, want_v1) <= 1e-5);

  {  // a resident primary is used whatever the use asks for; a resident twin of a skipped expert is used too
    ExpertStore s(load_manifest(b.dir), opts(0));
    { ExpertStore::Pin p = s.acquire(0, 4); p.wait(); }
    { ExpertStore::Pin p = s.acquire(0, 6, kTwin); p.wait(); }
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y.data(), serial_parallel_for(), {}, dyn);
    const LayerCounters& c = s.stats()->layers[0];
    CHECK_EQ(c.uses_high.load(), uint64_t{10});    // 8 top-1 uses + expert 4's two
    CHECK_EQ(c.uses_low.load(), uint64_t{4});      // expert 5's two, expert 6's two (resident twin)
    CHECK_EQ(c.uses_skipped.load(), uint64_t{2});  // expert 7
    CHECK(!s.is_resident(0, 4, kTwin));
  }
  {  // thresholds that ask for the primary everywhere: the exact result, bit for bit
    ExpertStore s(load_manifest(b.dir), opts(0));
    PrecisionOptions all_high = dyn;
    all_high.t1 = 0.99f;
    all_high.t2 = 1.0f;
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y.data(), serial_parallel_for(), {}, all_high);
    for (size_t i = 0; i < Y.size(); ++i) CHECK(Y[i] == Yexact[i]);
  }
}

static void test_unimportance_and_thresholds() {
  float s[3];
  const float w3[] = {0.2f, 0.5f, 0.3f};
  unimportance(w3, 3, s);
  CHECK(s[1] == 0.0f);
  CHECK(std::abs(s[2] - 0.5f) < 1e-6f && std::abs(s[0] - 0.8f) < 1e-6f);
  const float tie[] = {0.5f, 0.5f};
  unimportance(tie, 2, s);
  CHECK(s[0] == 0.0f && std::abs(s[1] - 0.5f) < 1e-6f);  // ties: the earlier slot ranks first
  const float zero[] = {0.0f, 0.0f};
  unimportance(zero, 2, s);
  CHECK(s[0] == 0.0f && s[1] == 0.0f);
  PrecisionOptions o;
  CHECK(precision_for(0.6f, o) == Precision::High && precision_for(0.61f, o) == Precision::Low);
  CHECK(precision_for(0.9f, o) == Precision::Low && precision_for(0.91f, o) == Precision::Skip);

  // top-2, 100 tokens: rank 1's weight uniform over the bins [0.05, 0.1) .. [0.45, 0.5) (10 each at 8 bins)
  // plus 20 at [0.0, 0.05): s = 1 - w. Pooled over 200 uses: 100 at s = 0, then s descending with w.
  RoutingProfile p;
  p.layers.resize(1);
  LayerProfile& lp = p.layers[0];
  for (int i = 0; i <= 20; ++i) lp.gate_edges.push_back(i * 0.05);
  lp.gate_counts.assign(2, std::vector<uint64_t>(20, 0));
  lp.gate_counts[0][15] = 100;  // rank 0 around 0.775: s = 0 whatever it is
  lp.gate_counts[1][0] = 20;
  for (int b = 1; b <= 8; ++b) lp.gate_counts[1][static_cast<size_t>(b)] = 10;
  const auto [t1, t2] = derive_thresholds(p);
  // 67% of 200 = 134: the 100 zeros, then 34 more from the smallest s (largest w: bins 8, 7, 6, 5 = 40) -> bin 5
  // (w = 0.275, s = 0.725); 97% = 194: 6 into the bin-0 group (w = 0.025, s = 0.975).
  CHECK(std::abs(t1 - 0.725f) < 1e-5f);
  CHECK(std::abs(t2 - 0.975f) < 1e-5f);
  RoutingProfile none;
  none.layers.resize(1);
  const auto d = derive_thresholds(none);
  CHECK(d.first == kDefaultT1 && d.second == kDefaultT2);
}

static void test_prefetch_reads_the_implied_copy() {
  TestBundle b = make_bundle(g_root / "pf", {{4, 16, 24}, {4, 16, 24}});
  add_twins(b);
  ExpertStore s(load_manifest(b.dir), opts(0));
  PrefetchOptions po;
  po.predictor = "gates";
  po.threshold = 0.05f;
  PrecisionOptions dyn;
  dyn.mode = MissPrecision::Dynamic;
  dyn.t1 = 0.6f;
  dyn.t2 = 0.9f;
  Prefetcher pf(s, po, std::nullopt, dyn);
  // Layer 1's predicted probabilities ~ (0.64, 0.24, 0.09, 0.03): normalized over the top 2, expert 1's
  // predicted unimportance is 0.64 / 0.88 = 0.73 -> its twin.
  const int64_t idx[] = {0, 1};
  const float logits[] = {3.0f, 2.0f, 1.0f, -0.1f};
  pf.on_layer(LayerSignals{0, idx, 1, 2, logits, 1, 4});
  s.drain();
  CHECK(s.is_resident(1, 0, kPrimary) && !s.is_resident(1, 0, kTwin));
  CHECK(s.is_resident(1, 1, kTwin) && !s.is_resident(1, 1, kPrimary));
  // A second expert the gates weigh at 0.08 (s = 0.92 > T2): its miss would be skipped, so nothing is read.
  ExpertStore s3(load_manifest(b.dir), opts(0));
  Prefetcher pf3(s3, po, std::nullopt, dyn);
  const float far[] = {3.0f, 0.55f, -4.0f, -4.0f};
  pf3.on_layer(LayerSignals{0, idx, 1, 2, far, 1, 4});
  s3.drain();
  CHECK(s3.is_resident(1, 0, kPrimary));
  CHECK(!s3.is_resident(1, 1, kPrimary) && !s3.is_resident(1, 1, kTwin));
  // exact: the primaries
  ExpertStore s2(load_manifest(b.dir), opts(0));
  Prefetcher pf2(s2, po, std::nullopt);
  pf2.on_layer(LayerSignals{0, idx, 1, 2, logits, 1, 4});
  s2.drain();
  CHECK(s2.is_resident(1, 1, kPrimary) && !s2.is_resident(1, 1, kTwin));
}

int main() {
  return run_tests("test_twins", {
                                     {"manifest_twins", test_manifest_twins},
                                     {"twin_bits_must_be_fewer", test_twin_bits_must_be_fewer},
                                     {"store_holds_both_copies", test_store_holds_both_copies},
                                     {"run_moe_dynamic", test_run_moe_dynamic},
                                     {"unimportance_and_thresholds", test_unimportance_and_thresholds},
                                     {"prefetch_reads_the_implied_copy", test_prefetch_reads_the_implied_copy},
                                 });
}
