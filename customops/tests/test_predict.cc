// The routing profile reader, the predictors and the prefetcher, per-layer and per-thread statistics, warm
// start. Runs on real files with real reads (store_testing.h).
#include <chrono>
#include <thread>

#include "edgemoe/engine.h"
#include "edgemoe/moe.h"
#include "edgemoe/prefetch_cost.h"
#include "edgemoe/prefetcher.h"
#include "edgemoe/scheduler.h"
#include "edgemoe/profile.h"
#include "edgemoe/warm_start.h"
#include "store_testing.h"

namespace {

// 3 layers x 4 experts, top-2.
TestBundle small_bundle(const std::string& name) { return make_bundle(g_root / name, {{4, 16, 24}, {4, 16, 24}, {4, 16, 24}}); }

// A valid profile of `b`: frequencies (over 200 tokens, top-2) 0.2, 0.3, 0.5, 1.0; token 7 -> experts {1, 2} at every layer; layer 2's
// order2 key (E0 = {0,1}, E1 = {0,1}) -> {2, 3}; its order1 key ({0,1}) -> {0, 1}.
json profile_doc(const TestBundle& b) {
  const Manifest m = load_manifest(b.dir);
  json layers = json::array(), autos = json::array();
  for (int l = 0; l < 3; ++l) {
    json tr = {{"order1", json::array()}, {"order2", json::array()}};
    if (l >= 1) tr["order1"].push_back({{"prev", {{0, 1}}}, {"next", {{0, 0.9}, {1, 0.8}}}});
    if (l == 2) tr["order2"].push_back({{"prev", {{0, 1}, {0, 1}}}, {"next", {{2, 0.95}, {3, 0.85}}}});
    layers.push_back({{"layer", l},
                      {"num_experts", 4},
                      {"top_k", 2},
                      {"tokens_seen", 200},
                      {"frequency", {40, 60, 100, 200}},
                      {"coactivation", {{0, 1, 1, 1}, {1, 0, 1, 1}, {1, 1, 0, 1}, {1, 1, 1, 0}}},
                      {"gate_weights", {{"edges", {0.0, 0.5, 1.0}}, {"counts", {{0, 100}, {100, 0}}}}},
                      {"transitions", tr},
                      {"tokens", {{"ids", {7}}, {"next", {{{1, 0.9}, {2, 0.7}}}}}}});
    autos.push_back(l == 0 ? json{"token"} : json{"table"});
  }
  return {{"format", "edgemoe-profile"},
          {"version", 1},
          {"bundle", {{"manifest_xxh3", manifest_identity(m)}}},
          {"corpus", {{"paths", {"x.txt"}}, {"train_tokens", 100}, {"heldout_tokens", 10}, {"heldout_share", 0.1}}},
          {"top_m", 4},
          {"min_count", 1},
          {"layers", layers},
          {"heldout", {{"recall_at", "top_k of the layer"}, {"recall", json::object()}, {"hit_rates", json::array()}}},
          {"auto", autos}};
}

std::string write_profile(const TestBundle& b, const json& doc, const std::string& name = "profile.json") {
  const std::string p = (b.dir / name).string();
  std::ofstream(p) << doc.dump(1);
  return p;
}

PrefetchOptions popts(const std::string& predictor, int depth = 1, float threshold = 0.1f) {
  PrefetchOptions o;
  o.predictor = predictor;
  o.depth = depth;
  o.threshold = threshold;
  return o;
}

}  // namespace

static void test_profile_load_and_errors() {
  TestBundle b = small_bundle("profile");
  const Manifest m = load_manifest(b.dir);
  json doc = profile_doc(b);
  RoutingProfile p = load_profile(write_profile(b, doc), m);
  CHECK_EQ(p.layers.size(), size_t{3});
  CHECK(std::fabs(p.layers[0].prior[2] - 0.5f) < 1e-6f);  // 100 assignments over 200 tokens
  CHECK(p.layers[2].order2.count(RoutingProfile::key({0, 1}, {0, 1})) == 1);
  CHECK(p.layers[1].order1.count(RoutingProfile::key({0, 1})) == 1);
  CHECK(p.layers[0].tokens.at(7).front().first == 1);
  CHECK_EQ(p.layers[0].auto_members, uint32_t{kPredictToken});

  auto broken = [&](const std::function<void(json&)>& edit) {
    json d = profile_doc(b);
    edit(d);
    return write_profile(b, d, "broken.json");
  };
  EXPECT_ERROR(load_profile(broken([](json& d) { d["bundle"]["manifest_xxh3"] = "0000000000000000"; }), m),
               "broken.json", "bundle.manifest_xxh3", "another bundle", "edgemoe-profile");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"].erase(2); }), m), "layers", "3 entries");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][0]["tokens"]["ids"] = {9, 7}; d["layers"][0]["tokens"]["next"] = {json::array(), json::array()}; }), m),
               "layers[0].tokens.ids[1]", "sorted ascending");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][1]["tokens"]["next"][0][0][1] = 1.5; }), m),
               "layers[1].tokens.next[0][0][1]", "(0, 1]");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][2]["transitions"]["order1"][0]["prev"][0] = {1, 0}; }), m),
               "layers[2].transitions.order1[0].prev[0]", "sorted ascending");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][0]["transitions"]["order1"] = d["layers"][1]["transitions"]["order1"]; }), m),
               "layers[0].transitions.order1", "no earlier layers");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][1]["frequency"][0] = 201; }), m), "layers[1].frequency[0]",
               "[0, 200]");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["auto"][1] = {"magic"}; }), m), "auto[1][0]", "residual");
  EXPECT_ERROR(load_profile(broken([](json& d) { d["layers"][0]["num_experts"] = 5; }), m), "layers[0].num_experts", "[4, 4]");
  { std::ofstream(b.dir / "broken.json") << "{not json"; }
  EXPECT_ERROR(load_profile((b.dir / "broken.json").string(), m), "broken.json", "valid JSON");
  EXPECT_ERROR(load_profile((b.dir / "missing.json").string(), m), "missing.json", "readable file");
  // Nested far too deep (a recursive dump of it overflowed the stack): one error, no crash.
  { std::ofstream(b.dir / "deep.json") << std::string(100000, '[') << std::string(100000, ']'); }
  EXPECT_ERROR(load_profile((b.dir / "deep.json").string(), m), "deep.json", "levels of nested lists/objects");
}

static void test_token_predictor_reads_every_layer_at_token_start() {
  TestBundle b = small_bundle("token");
  const Manifest m = load_manifest(b.dir);
  ExpertStore s(load_manifest(b.dir), opts(0));
  Prefetcher pf(s, popts("token"), load_profile(write_profile(b, profile_doc(b)), m));
  const int64_t ids[] = {7};
  pf.on_tokens(ids, 1);
  s.drain();
  for (int l = 0; l < 3; ++l) CHECK(s.is_resident(l, 1) && s.is_resident(l, 2) && !s.is_resident(l, 0));
  const int64_t unknown[] = {8};  // not in the table: the frequencies (expert 3: 1.0, expert 2: 0.5)
  ExpertStore s2(load_manifest(b.dir), opts(0));
  Prefetcher pf2(s2, popts("token"), load_profile((b.dir / "profile.json").string(), m));
  pf2.on_tokens(unknown, 1);
  s2.drain();
  CHECK(s2.is_resident(0, 3) && s2.is_resident(0, 2) && !s2.is_resident(0, 1));
  CHECK_EQ(s2.stats()->layers[0].prefetch_issued.load(), uint64_t{2});
}

static void test_gates_predictor_and_adaptive_depth() {
  TestBundle b = small_bundle("gates");
  ExpertStore s(load_manifest(b.dir), opts(0));
  Prefetcher pf(s, popts("gates", /*depth=*/2), std::nullopt);
  // Token 0 at layer 0; next logits of layers 1 and 2: layer 1 prefers {3, 0}, layer 2 {1, 2}.
  const int64_t idx[] = {0, 1};
  const float logits[] = {3.0f, -5.0f, -5.0f, 4.0f, /* layer 2 */ -5.0f, 4.0f, 3.0f, -5.0f};
  LayerSignals sig{0, idx, 1, 2, logits, 2, 4};
  pf.on_layer(sig);
  s.drain();
  CHECK(s.is_resident(1, 3) && s.is_resident(1, 0));
  CHECK(!s.is_resident(2, 1) && !s.is_resident(2, 2));  // layer 1 was not resident: no deeper look
  pf.on_layer(sig);  // the same pass again (a new pass: layer 0 <= 0): layer 1 is resident now -> layer 2
  s.drain();
  CHECK(s.is_resident(2, 1) && s.is_resident(2, 2));
  // Below the threshold nothing is read: flat logits give q = 1/4 per expert < 0.3.
  ExpertStore s2(load_manifest(b.dir), opts(0));
  Prefetcher flat(s2, popts("gates", 1, 0.3f), std::nullopt);
  const float even[] = {0, 0, 0, 0, 0, 0, 0, 0};
  flat.on_layer(LayerSignals{0, idx, 1, 2, even, 2, 4});
  s2.drain();
  CHECK_EQ(s2.stats()->prefetch_issued.load(), uint64_t{0});
  // A predictor that needs a profile without one is refused.
  EXPECT_ERROR(Prefetcher(s2, popts("table"), std::nullopt), "edgemoe.predictor", "profile", "edgemoe-profile");
}

static void test_table_predictor_backs_off() {
  TestBundle b = small_bundle("table");
  const Manifest m = load_manifest(b.dir);
  ExpertStore s(load_manifest(b.dir), opts(0));
  Prefetcher pf(s, popts("table"), load_profile(write_profile(b, profile_doc(b)), m));
  const int64_t e01[] = {1, 0};
  pf.on_layer(LayerSignals{0, e01, 1, 2, nullptr, 0, 0});  // -> layer 1 by order1({0,1}) = {0, 1}
  s.drain();
  CHECK(s.is_resident(1, 0) && s.is_resident(1, 1) && !s.is_resident(1, 2));
  pf.on_layer(LayerSignals{1, e01, 1, 2, nullptr, 0, 0});  // -> layer 2 by order2({0,1},{0,1}) = {2, 3}
  s.drain();
  CHECK(s.is_resident(2, 2) && s.is_resident(2, 3) && !s.is_resident(2, 0));
  const int64_t e23[] = {2, 3};
  ExpertStore s2(load_manifest(b.dir), opts(0));
  Prefetcher pf2(s2, popts("table"), load_profile((b.dir / "profile.json").string(), m));
  pf2.on_layer(LayerSignals{1, e23, 1, 2, nullptr, 0, 0});  // unknown key: frequencies {3, 2}
  s2.drain();
  CHECK(s2.is_resident(2, 3) && s2.is_resident(2, 2) && !s2.is_resident(2, 1));
}

// Protected predictions survive a lower-confidence prefetch and prefetches stay under the budget.
static void test_prefetch_under_budget_with_protection() {
  TestBundle b = small_bundle("budget");
  const uint64_t L = b.length(0, 0);
  ExpertStore s(load_manifest(b.dir), opts(3 * L));
  Prefetcher pf(s, popts("gates", 1), std::nullopt);
  const int64_t idx[] = {0, 1};
  const float strong[] = {6.0f, 6.0f, -9.0f, -9.0f};  // layer 1: {0, 1} at ~0.5 each
  pf.on_layer(LayerSignals{0, idx, 1, 2, strong, 1, 4});
  s.drain();
  CHECK(s.is_resident(1, 0) && s.is_resident(1, 1));
  const float weak[] = {-9.0f, -9.0f, 0.5f, 0.0f};  // a different token: layer 2 {2, 3} at lower confidence
  pf.on_layer(LayerSignals{1, idx, 1, 2, weak, 1, 4});
  s.drain();
  CHECK(s.stats()->peak_resident_bytes.load() <= 3 * L);
  CHECK(s.stats()->peak_arena_bytes.load() <= 3 * L);
  // A full cache of layer-0 experts: a prefetch for layer 1, however sure, never takes another layer's room.
  ExpertStore s2(load_manifest(b.dir), opts(2 * L));
  { ExpertStore::Pin p = s2.acquire(0, 0); CHECK(blob_ok(p)); }
  { ExpertStore::Pin p = s2.acquire(0, 1); CHECK(blob_ok(p)); }
  CHECK(!s2.prefetch(1, 0, PrefetchHint{1, 1.0f}));
  CHECK(s2.is_resident(0, 0) && s2.is_resident(0, 1));
  // Within its layer it swaps out the expert predicted less likely.
  s2.protect({{{0, 0}, 0.9f}, {{0, 1}, 0.1f}});
  CHECK(s2.prefetch(0, 2, PrefetchHint{1, 0.6f}));
  s2.drain();
  CHECK(s2.is_resident(0, 0) && !s2.is_resident(0, 1) && s2.is_resident(0, 2));
  s2.protect({{{1, 0}, 0.9f}});  // layer 0 not predicted at all: its residents count 0.5
  CHECK(!s2.prefetch(0, 3, PrefetchHint{1, 0.4f}));
  CHECK(s2.prefetch(0, 3, PrefetchHint{1, 0.7f}));
  s2.drain();
  s2.protect({{{0, 3}, 0.9f}});  // layer 0 predicted: an expert left out of it counts 0
  CHECK(s2.prefetch(0, 1, PrefetchHint{1, 0.05f}));
  s2.drain();
  // Left-out experts may count more than 0 (the prefetcher passes the measured reuse rate).
  s2.protect({{{0, 2}, 0.9f}}, 0.6f);
  CHECK(!s2.prefetch(0, 0, PrefetchHint{1, 0.5f}));
  CHECK(s2.prefetch(0, 0, PrefetchHint{1, 0.7f}));
}

// Counters per layer sum to the store's; per-thread counters see only their own thread's calls.
static void test_layer_and_thread_stats() {
  TestBundle b = small_bundle("tstats");
  ExpertStore s(load_manifest(b.dir), opts(0));
  auto st = s.stats();
  auto work = [&](int layer, int n, uint64_t* hits, uint64_t* misses) {
    auto mine = thread_stats_begin(st->store_id, 3);
    for (int i = 0; i < n; ++i) {
      ExpertStore::Pin p = s.acquire(layer, i % 4);
      CHECK(blob_ok(p));
    }
    *hits = mine->total.hits.load();
    *misses = mine->total.misses.load();
    CHECK_EQ(mine->layers[static_cast<size_t>(layer)].hits.load() + mine->layers[static_cast<size_t>(layer)].misses.load(),
             static_cast<uint64_t>(n));
    thread_stats_end(st->store_id);
  };
  uint64_t h1 = 0, m1 = 0, h2 = 0, m2 = 0;
  std::thread t1([&] { work(0, 12, &h1, &m1); });
  std::thread t2([&] { work(1, 7, &h2, &m2); });
  t1.join();
  t2.join();
  CHECK_EQ(h1 + m1, uint64_t{12});
  CHECK_EQ(h2 + m2, uint64_t{7});
  CHECK_EQ(m1, uint64_t{4});
  CHECK_EQ(m2, uint64_t{4});
  uint64_t hits = 0, misses = 0, reads = 0;
  for (const auto& l : st->layers) {
    hits += l.hits.load();
    misses += l.misses.load();
    reads += l.reads.load();
  }
  CHECK_EQ(hits, st->hits.load());
  CHECK_EQ(misses, st->misses.load());
  CHECK_EQ(reads, st->reads.load());
  CHECK(thread_stats_current(st->store_id) == nullptr);
}

static void test_warm_start_and_saved_sets() {
  TestBundle b = small_bundle("warm");
  write_profile(b, profile_doc(b));
  const uint64_t L = b.length(0, 0);
  RuntimeConfig cfg;
  cfg.bundle_dir = b.dir.string();
  cfg.budget = std::to_string(6 * L);  // room for 6 - 2 (one layer's misses) = 4 warm experts
  cfg.store = opts(0);
  cfg.prefetch.warm_start = "profile";
  {
    Engine e(load_manifest(b.dir), cfg);
    e.store().drain();
    // The most used expert of every layer (3: 1.0) and one expert 2 (0.5): 4 experts, most frequent first.
    CHECK(e.store().is_resident(0, 3) && e.store().is_resident(1, 3) && e.store().is_resident(2, 3));
    CHECK(e.store().is_resident(0, 2));
    CHECK(e.store().resident_bytes() <= 4 * L);
    save_resident_set(e.store(), (b.dir / "resident.json").string());
  }
  cfg.prefetch.warm_start = (b.dir / "resident.json").string();
  cfg.store = opts(0);
  {
    Engine e(load_manifest(b.dir), cfg);
    e.store().drain();
    CHECK(e.store().is_resident(0, 3) && e.store().is_resident(0, 2) && !e.store().is_resident(0, 0));
  }
  // Another bundle's set is refused, naming the file and the identity.
  TestBundle other = make_bundle(g_root / "warm_other", {{4, 16, 24}, {4, 16, 24}, {4, 16, 24}}, 7);
  RuntimeConfig oc = cfg;
  oc.bundle_dir = other.dir.string();
  oc.store = opts(0);
  EXPECT_ERROR(Engine(load_manifest(other.dir), oc), "resident.json", "manifest_xxh3", "another bundle");
  oc.prefetch.warm_start = "profile";  // no profile there
  EXPECT_ERROR(Engine(load_manifest(other.dir), oc), "edgemoe.warm_start", "profile.json", "edgemoe-profile");
  // A resident-set file nested far too deep: one error, no crash.
  { std::ofstream(b.dir / "deep-set.json") << "{\"experts\": " << std::string(100000, '[') << std::string(100000, ']') << "}"; }
  cfg.prefetch.warm_start = (b.dir / "deep-set.json").string();
  cfg.store = opts(0);
  EXPECT_ERROR(Engine(load_manifest(b.dir), cfg), "deep-set.json", "levels of nested lists/objects");
}

// Exact mode: prefetching never changes an output bit.
static void test_outputs_identical_with_prefetch() {
  TestBundle b = small_bundle("exact");
  const int64_t T = 5, H = 16, K = 2;
  std::vector<float> X(static_cast<size_t>(T * H));
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto& x : X) x = nd(rng);
  std::vector<int64_t> idx = {0, 1, 2, 3, 1, 2, 3, 0, 0, 2};
  std::vector<float> w = {0.6f, 0.4f, 0.5f, 0.5f, 0.7f, 0.3f, 0.9f, 0.1f, 0.2f, 0.8f};
  std::vector<float> logits(static_cast<size_t>(T * 2 * 4));
  for (auto& z : logits) z = nd(rng);
  auto run = [&](bool predict, uint64_t budget) {
    ExpertStore s(load_manifest(b.dir), opts(budget));
    Prefetcher pf(s, popts("gates", 2, 0.05f), std::nullopt);
    std::vector<float> Y(X.size()), all;
    for (int pass = 0; pass < 3; ++pass) {
      for (int32_t l = 0; l < 3; ++l) {
        MoeAttrs a;
        a.layer = l;
        a.num_experts = 4;
        a.top_k = 2;
        LayerSignals sig{l, idx.data(), T, K, l < 2 ? logits.data() : nullptr, l < 2 ? 2 - l : 0, 4};
        std::function<void()> hook;
        if (predict) hook = [&] { pf.on_layer(sig); };
        run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y.data(), serial_parallel_for(), hook);
        all.insert(all.end(), Y.begin(), Y.end());
      }
    }
    return all;
  };
  const uint64_t L = b.length(0, 0);
  const std::vector<float> ref = run(false, 0);
  for (uint64_t budget : {uint64_t{0}, 4 * L, 2 * L}) CHECK(run(true, budget) == ref);
}

// The cost rule (prefetch_cost.h): read iff p * min(1, lead / r) > (1 - p) * u; calibration from observations.
static void test_prefetch_cost_rule() {
  CHECK(prefetch_gain(0.5, 1.0, 0.0).read);                    // an idle device: any chance pays
  CHECK(std::abs(prefetch_gain(0.5, 1.0, 0.0).victim_below - 1.0f) < 1e-6f);  // gain 0.5 over 0.5: any victim
  CHECK(!prefetch_gain(0.5, 0.1, 0.9).read);                   // 0.05 saved vs 0.45 of a busy device's time
  CHECK(prefetch_gain(0.95, 0.2, 0.9).read);                   // 0.19 vs 0.045
  CHECK(std::abs(prefetch_gain(0.95, 0.2, 0.9).victim_below - 1.0f) < 1e-6f);  // 0.145 / 0.05 > 1
  CHECK(std::abs(prefetch_gain(0.6, 0.5, 0.5).victim_below - 0.25f) < 1e-6f);  // (0.3 - 0.2) / 0.4
  CHECK(!prefetch_gain(0.0, 1.0, 0.0).read && !prefetch_gain(std::nan(""), 1.0, 0.0).read);
  CHECK(!prefetch_gain(1.0, 0.0, 0.0).read);                   // no lead: nothing to hide

  PrefetchCostModel m(2);
  CHECK(std::abs(m.calibrated(0.15f, 1, false) - 0.15f) < 1e-6f);  // no observations: the prior, q itself
  for (int i = 0; i < 100; ++i) m.observe_prediction(0.15f, 1, true);  // q 0.15 at distance 1: always used
  CHECK(m.calibrated(0.15f, 1, false) > 0.95f);
  CHECK(std::abs(m.calibrated(0.15f, 2, false) - 0.15f) < 1e-6f);  // another distance: its own bins
  CHECK(std::abs(m.calibrated(0.15f, 1, true) - 0.15f) < 1e-6f);   // a batch's q is left as is
  for (int i = 0; i < 300; ++i) m.observe_prediction(0.75f, 2, false);  // never used
  CHECK(m.calibrated(0.75f, 2, false) < 0.02f);
  // the residual node's predictions: a row of their own, whatever the distance
  CHECK(std::abs(m.calibrated(0.15f, 1, false, true) - 0.15f) < 1e-6f);
  for (int i = 0; i < 300; ++i) m.observe_prediction(0.45f, 1, true, true);
  CHECK(m.calibrated(0.45f, 1, false, true) > 0.95f);
  CHECK(std::abs(m.calibrated(0.45f, 1, false) - 0.45f) < 1e-6f);
  // Before any interval: the read counts as hidden whole, the device as idle.
  CHECK(m.evaluate(0.3f, 1.0, 1000, 20000.0).read);
  // One interval: 10 ms, of which 6 ms waiting (compute 4 ms per layer), the device busy 9 ms (u = 0.9).
  m.observe_interval(10e6, 6e6, 9e6);
  CHECK(std::abs(m.compute_per_layer_ns() - 4e6) < 1.0 && std::abs(m.busy_fraction() - 0.9) < 1e-9);
  // A 20 ms read one layer ahead hides 4 of its 20 ms: save 0.2.
  CHECK(m.evaluate(0.9f, 1.0, 1000, 20000.0).read);    // 0.18 > 0.09
  CHECK(!m.evaluate(0.6f, 1.0, 1000, 20000.0).read);   // 0.12 < 0.36
  CHECK(m.evaluate(0.6f, 5.0, 1000, 20000.0).read);    // five layers ahead it is hidden whole: 0.6 > 0.36
  CHECK(std::abs(m.evaluate(0.6f, 5.0, 1000, 20000.0).victim_below - 0.6f) < 1e-6f);  // (0.6 - 0.36) / 0.4
  m.observe_interval(10e6, 10e6, 0.0);  // a stalled, idle interval moves the averages by a tenth
  CHECK(std::abs(m.compute_per_layer_ns() - 3.6e6) < 1.0 && std::abs(m.busy_fraction() - 0.81) < 1e-9);
  m.observe_interval(0.0, 0.0, 0.0);  // empty intervals are ignored
  CHECK(std::abs(m.busy_fraction() - 0.81) < 1e-9);
  // A resident's value: this pass's chance of use, or a later token's (rho = hits per pass / residents).
  CHECK(m.reuse() == 0.0 && std::abs(m.keep_value(0.5f) - 0.5f) < 1e-6f);
  m.observe_pass(30, 60);
  CHECK(std::abs(m.reuse() - 0.5) < 1e-9 && std::abs(m.keep_value(0.5f) - 0.75f) < 1e-6f);
  CHECK(std::abs(m.keep_value(0.0f) - 0.5f) < 1e-6f);
  m.observe_pass(60, 60);  // averaged with weight 0.1
  CHECK(std::abs(m.reuse() - 0.55) < 1e-9);
  m.observe_pass(5, 0);  // nothing resident: ignored
  CHECK(std::abs(m.reuse() - 0.55) < 1e-9);

  // The scheduler's busy time: two 30 ms tasks on one thread are 60 ms busy, within the elapsed time.
  struct Task : ReadTask {};
  const auto t0 = std::chrono::steady_clock::now();
  {
    ReadScheduler sched(1, [](const std::shared_ptr<ReadTask>&) { std::this_thread::sleep_for(std::chrono::milliseconds(30)); });
    sched.submit(ReadScheduler::prepare(), std::make_shared<Task>());
    sched.submit(ReadScheduler::prepare(), std::make_shared<Task>());
    while (sched.queue_size() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const double busy = static_cast<double>(sched.busy_ns());
    const double wall = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    CHECK(busy >= 59e6 && busy <= wall);
  }
}

// A store whose reads take far longer than a layer computes: the prefetcher declines what a busy device
// could not hide, and counts it.
static void test_prefetch_declined_on_slow_storage() {
  TestBundle b = small_bundle("declined");
  StoreOptions so = opts(0);
  so.throttle_latency_us = 40000;  // 40 ms per read
  ExpertStore s(load_manifest(b.dir), so);
  { ExpertStore::Pin p = s.acquire(0, 3); CHECK(blob_ok(p)); }  // one read: the store's time per byte
  Prefetcher pf(s, popts("gates", 1, 0.05f), std::nullopt);
  const int64_t idx[] = {0, 1};
  const float logits[] = {2.0f, 1.0f, 0.0f, -1.0f};  // layer 1: expert 0 at 0.64, expert 1 at 0.24
  pf.on_layer(LayerSignals{0, idx, 1, 2, logits, 1, 4});  // no interval yet: reads as if hidden whole
  CHECK_EQ(s.stats()->layers[1].prefetch_issued.load(), uint64_t{2});
  // Layer 1 follows right away (no compute) while those reads keep the device busy.
  pf.on_layer(LayerSignals{1, idx, 1, 2, logits, 1, 4});
  s.drain();
  CHECK(s.is_resident(1, 0) && s.is_resident(1, 1));
  CHECK_EQ(s.stats()->layers[2].prefetch_issued.load(), uint64_t{0});
  CHECK(s.stats()->layers[2].prefetch_declined.load() >= 1);
}

// residual: the ResidualPrefetch node's scores predict its layer; a layer without a node falls back to the
// stacked gates; auto follows the profile (residual alone, or combined with the layer before's members).
static void test_residual_predictor() {
  TestBundle b = small_bundle("residual");
  const Manifest m = load_manifest(b.dir);
  CHECK_EQ(predictor_bit("residual"), uint32_t{kPredictResidual});
  CHECK(predictor_list("none", "auto") == "none, table, gates, token, residual or auto");
  ExpertStore s(load_manifest(b.dir), opts(0));
  Prefetcher pf(s, popts("residual"), std::nullopt);  // needs no profile
  pf.wire_residual(1);
  CHECK(pf.residual_wired(1) && !pf.residual_wired(2));
  const int64_t idx[] = {0, 1};
  const float logits[] = {-5.0f, -5.0f, 4.0f, 3.0f};  // the stacked gates: layer 1 {2, 3}
  pf.on_layer(LayerSignals{0, idx, 1, 2, logits, 1, 4});  // layer 1 has a node: the gates are not used
  s.drain();
  CHECK_EQ(s.stats()->prefetch_issued.load(), uint64_t{0});
  const float scores[] = {0.55f, 0.40f, 0.03f, 0.02f};  // the residual: layer 1 {0, 1}
  pf.on_residual(1, scores, 1, 4);
  s.drain();
  CHECK(s.is_resident(1, 0) && s.is_resident(1, 1) && !s.is_resident(1, 2));
  // layer 2 has no node: the gates predict it (a fresh pass at layer 1: no interval for the cost rule yet)
  ExpertStore s1(load_manifest(b.dir), opts(0));
  Prefetcher pf1(s1, popts("residual"), std::nullopt);
  pf1.wire_residual(1);
  pf1.on_layer(LayerSignals{1, idx, 1, 2, logits, 1, 4});
  s1.drain();
  CHECK(s1.is_resident(2, 2) && s1.is_resident(2, 3));
  // batch: q = 1 - prod (1 - p)
  ExpertStore s2(load_manifest(b.dir), opts(0));
  Prefetcher pf2(s2, popts("residual", 1, 0.5f), std::nullopt);
  const float two[] = {0.4f, 0.0f, 0.3f, 0.3f, 0.4f, 0.0f, 0.3f, 0.3f};  // expert 0: 0.64 > 0.5, expert 2: 0.51
  pf2.on_residual(2, two, 2, 4);
  s2.drain();
  CHECK(s2.is_resident(2, 0) && s2.is_resident(2, 2) && !s2.is_resident(2, 3));
  // auto: layer 1's auto list is residual alone, layer 2's table: the node reads layer 1 only
  json doc = profile_doc(b);
  doc["auto"][1] = {"residual"};
  ExpertStore s3(load_manifest(b.dir), opts(0));
  Prefetcher pf3(s3, popts("auto"), load_profile(write_profile(b, doc, "residual.json"), m));
  pf3.on_residual(1, scores, 1, 4);
  pf3.on_residual(2, scores, 1, 4);
  s3.drain();
  CHECK(s3.is_resident(1, 0) && s3.is_resident(1, 1));
  CHECK_EQ(s3.stats()->layers[2].prefetch_issued.load(), uint64_t{0});
  doc["auto"][1] = {"residual", "table"};  // combined: the mean with the table's order1 {0: 0.9, 1: 0.8}
  ExpertStore s4(load_manifest(b.dir), opts(0));
  Prefetcher pf4(s4, popts("auto", 1, 0.4f), load_profile(write_profile(b, doc, "residual.json"), m));
  pf4.wire_residual(1);
  const int64_t e01[] = {0, 1};
  pf4.on_layer(LayerSignals{0, e01, 1, 2, nullptr, 0, 0});  // layer 1 is the node's: the table's q, no read
  CHECK_EQ(s4.stats()->layers[1].prefetch_issued.load(), uint64_t{0});
  const float other[] = {0.02f, 0.03f, 0.55f, 0.40f};  // the residual prefers {2, 3}
  pf4.on_residual(1, other, 1, 4);  // means: 0: 0.46, 1: 0.415, 2: 0.275, 3: 0.2 -> {0, 1} >= 0.4
  s4.drain();
  CHECK(s4.is_resident(1, 0) && s4.is_resident(1, 1) && !s4.is_resident(1, 2) && !s4.is_resident(1, 3));
  // without a node for layer 1 the layer call predicts it with what it has (the table) and reads
  ExpertStore s5(load_manifest(b.dir), opts(0));
  Prefetcher pf5(s5, popts("auto", 1, 0.4f), load_profile((b.dir / "residual.json").string(), m));
  pf5.on_layer(LayerSignals{0, e01, 1, 2, nullptr, 0, 0});
  s5.drain();
  CHECK(s5.is_resident(1, 0) && s5.is_resident(1, 1));
  // auto without a profile: the stacked gates alone; the node only copies
  ExpertStore s6(load_manifest(b.dir), opts(0));
  Prefetcher pf6(s6, popts("auto"), std::nullopt);
  pf6.wire_residual(1);
  pf6.on_layer(LayerSignals{0, idx, 1, 2, logits, 1, 4});
  pf6.on_residual(1, scores, 1, 4);
  s6.drain();
  CHECK(s6.is_resident(1, 2) && s6.is_resident(1, 3) && !s6.is_resident(1, 0));
  EXPECT_ERROR(Prefetcher(s4, popts("resid"), std::nullopt), "edgemoe.predictor", "residual or auto", "'resid'");
}

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"profile_load_and_errors", test_profile_load_and_errors},
      {"token_predictor_reads_every_layer_at_token_start", test_token_predictor_reads_every_layer_at_token_start},
      {"gates_predictor_and_adaptive_depth", test_gates_predictor_and_adaptive_depth},
      {"table_predictor_backs_off", test_table_predictor_backs_off},
      {"prefetch_under_budget_with_protection", test_prefetch_under_budget_with_protection},
      {"layer_and_thread_stats", test_layer_and_thread_stats},
      {"warm_start_and_saved_sets", test_warm_start_and_saved_sets},
      {"outputs_identical_with_prefetch", test_outputs_identical_with_prefetch},
      {"prefetch_cost_rule", test_prefetch_cost_rule},
      {"prefetch_declined_on_slow_storage", test_prefetch_declined_on_slow_storage},
      {"residual_predictor", test_residual_predictor},
  };
  return run_tests("test_predict", tests);
}
