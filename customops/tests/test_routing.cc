// The cache-aware router (edgemoe/routing.h): exact = ONNX TopK, cache-prior, max-rank, the running logit
// range, the counts; and the residency snapshot it reads from a real store.
#include "edgemoe/routing.h"

#include "store_testing.h"

namespace {

struct Routed {
  std::vector<float> values;
  std::vector<int64_t> indices;
  RouteCounts counts;
};

Routed route(CacheAwareRouter& r, const std::vector<float>& scores, int64_t E, int64_t k,
             const std::vector<uint8_t>* resident, ScoreKind kind = ScoreKind::Logits, int32_t layer = 0) {
  const int64_t T = static_cast<int64_t>(scores.size()) / E;
  Routed out;
  out.values.assign(static_cast<size_t>(T * k), -1.0f);
  out.indices.assign(static_cast<size_t>(T * k), -1);
  r.route(layer, kind, scores.data(), T, E, k, resident ? resident->data() : nullptr, out.values.data(),
          out.indices.data(), &out.counts);
  return out;
}

RoutingOptions ropts(RoutingRule rule, float lambda = 0.5f, int32_t keep = 1, int32_t window = 0) {
  RoutingOptions o;
  o.rule = rule;
  o.lambda = lambda;
  o.keep = keep;
  o.window = window;
  return o;
}

// Reference ONNX TopK (largest, sorted): stable sort by descending score, so equal scores keep index order.
std::vector<int64_t> reference_topk(const float* row, int64_t E, int64_t k) {
  std::vector<int64_t> idx(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) idx[static_cast<size_t>(e)] = e;
  std::stable_sort(idx.begin(), idx.end(), [row](int64_t a, int64_t b) {
    const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
    if (na != nb) return nb;
    return !na && row[a] > row[b];
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

void test_exact_is_onnx_topk() {
  CacheAwareRouter r(ropts(RoutingRule::Exact), 1);
  CHECK(!r.biased());
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> coarse(0, 4);  // many ties
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t E = 1 + trial % 17, k = 1 + trial % E, T = 3;
    std::vector<float> s(static_cast<size_t>(T * E));
    for (auto& x : s) x = trial % 3 == 0 ? static_cast<float>(coarse(rng)) : std::ldexp(static_cast<float>(rng() % 1000), -7);
    if (trial % 5 == 0) s[0] = std::numeric_limits<float>::quiet_NaN();
    if (trial % 7 == 0) s[1] = -0.0f;
    const std::vector<uint8_t> all(static_cast<size_t>(E), 1);
    const Routed got = route(r, s, E, k, &all);
    for (int64_t t = 0; t < T; ++t) {
      const std::vector<int64_t> want = reference_topk(s.data() + t * E, E, k);
      for (int64_t j = 0; j < k; ++j) {
        CHECK(got.indices[static_cast<size_t>(t * k + j)] == want[static_cast<size_t>(j)]);
        const float v = got.values[static_cast<size_t>(t * k + j)], w = s[static_cast<size_t>(t * E + want[static_cast<size_t>(j)])];
        CHECK(std::memcmp(&v, &w, sizeof v) == 0);  // the score itself, bit for bit
      }
    }
    CHECK(got.counts.selections == static_cast<uint64_t>(T * k));
    CHECK(got.counts.changed == 0 && got.counts.misses_avoided == 0);
  }
}

void test_cache_prior() {
  // logits of one token over 4 experts; range 3 -> delta 3 after this first token
  const std::vector<float> z = {3.0f, 2.0f, 1.5f, 0.0f};
  const std::vector<uint8_t> res = {0, 0, 1, 0};  // only expert 2 resident
  {
    CacheAwareRouter r(ropts(RoutingRule::CachePrior, 0.0f, 0), 1);  // lambda 0 = exact
    CHECK(!r.biased());
    const Routed o = route(r, z, 4, 2, &res);
    CHECK((o.indices == std::vector<int64_t>{0, 1}));
  }
  {
    // J = 0 (the paper's rule), lambda 0.2: bias 0.6 -> z' = 3, 2, 2.1, 0 -> {0, 2}; values unbiased
    CacheAwareRouter r(ropts(RoutingRule::CachePrior, 0.2f, 0), 1);
    const Routed o = route(r, z, 4, 2, &res);
    CHECK((o.indices == std::vector<int64_t>{0, 2}));
    CHECK((o.values == std::vector<float>{3.0f, 1.5f}));
    CHECK(std::fabs(r.logit_range(0) - 3.0) < 1e-12);
    CHECK(o.counts.changed == 1 && o.counts.misses_avoided == 1);  // expert 1 was needed and not resident
  }
  {
    // J = 0, lambda 0.6: bias 1.8 -> z'_2 = 3.3 beats the true top-1: {2, 0}
    CacheAwareRouter r(ropts(RoutingRule::CachePrior, 0.6f, 0), 1);
    const Routed o = route(r, z, 4, 2, &res);
    CHECK((o.indices == std::vector<int64_t>{2, 0}));
    // J = 1 keeps expert 0 first whatever the bias
    CacheAwareRouter r1(ropts(RoutingRule::CachePrior, 0.6f, 1), 1);
    const Routed o1 = route(r1, z, 4, 2, &res);
    CHECK((o1.indices == std::vector<int64_t>{0, 2}));
  }
  {
    // probabilities: the same choice as their logits (log p = z - const)
    std::vector<float> p(4);
    double sum = 0;
    for (float v : z) sum += std::exp(static_cast<double>(v));
    for (size_t i = 0; i < 4; ++i) p[i] = static_cast<float>(std::exp(static_cast<double>(z[i])) / sum);
    CacheAwareRouter r(ropts(RoutingRule::CachePrior, 0.2f, 0), 1);
    const Routed o = route(r, p, 4, 2, &res, ScoreKind::Probs);
    CHECK((o.indices == std::vector<int64_t>{0, 2}));
    CHECK(std::fabs(r.logit_range(0) - 3.0) < 1e-5);
    CHECK((o.values == std::vector<float>{p[0], p[2]}));
  }
  {
    // the running mean of the range: tokens with ranges 2 and 4 -> 3; a bias too small for the first token
    CacheAwareRouter r(ropts(RoutingRule::CachePrior, 0.2f, 0), 2);
    const std::vector<float> two = {1.0f, 0.0f, 0.5f, -1.0f, /**/ 4.0f, 0.0f, 1.0f, 0.0f};
    route(r, two, 4, 2, &res, ScoreKind::Logits, 1);
    CHECK(std::fabs(r.logit_range(1) - 3.0) < 1e-12);
    CHECK(r.logit_range(0) == 0.0);  // per layer
  }
}

void test_max_rank() {
  // true order 0 > 1 > 2 > 3 > 4 > 5
  const std::vector<float> z = {6, 5, 4, 3, 2, 1};
  auto pick = [&](int32_t keep, int32_t window, std::vector<uint8_t> res, int64_t k = 2) {
    CacheAwareRouter r(ropts(RoutingRule::MaxRank, 0.5f, keep, window), 1);
    return route(r, z, 6, k, &res);
  };
  CHECK((pick(1, 4, {0, 0, 0, 1, 1, 0}).indices == std::vector<int64_t>{0, 3}));  // resident rank 3 inside top-4
  CHECK((pick(1, 3, {0, 0, 0, 1, 1, 0}).indices == std::vector<int64_t>{0, 1}));  // none inside top-3: rank order
  CHECK((pick(1, 0, {0, 0, 0, 1, 0, 0}).indices == std::vector<int64_t>{0, 3}));  // M = 0 means 2k = 4
  CHECK((pick(0, 6, {0, 0, 0, 1, 1, 0}).indices == std::vector<int64_t>{3, 4}));  // J = 0: both from residents
  CHECK((pick(2, 6, {0, 0, 0, 1, 1, 0}).indices == std::vector<int64_t>{0, 1}));  // J >= k: exact
  CHECK((pick(1, 6, {0, 0, 0, 1, 1, 1}, 3).indices == std::vector<int64_t>{0, 3, 4}));  // rank order of the chosen
  const Routed o = pick(0, 6, {0, 0, 0, 1, 1, 0});
  CHECK(o.counts.changed == 2 && o.counts.misses_avoided == 2);
  CHECK((o.values == std::vector<float>{3, 2}));
  // several tokens needing the same missing expert count it once per call
  CacheAwareRouter r(ropts(RoutingRule::MaxRank, 0.5f, 1, 3), 1);
  const std::vector<uint8_t> res = {1, 0, 1, 0, 0, 0};
  const Routed two = route(r, {6, 5, 4, 3, 2, 1, /**/ 6, 5, 4, 3, 2, 1}, 6, 2, &res);
  CHECK((two.indices == std::vector<int64_t>{0, 2, 0, 2}));
  CHECK(two.counts.selections == 4 && two.counts.changed == 2 && two.counts.misses_avoided == 1);
}

void test_parse_and_residency() {
  CHECK(parse_routing_rule("exact") == RoutingRule::Exact);
  CHECK(parse_routing_rule("cache-prior") == RoutingRule::CachePrior);
  CHECK(parse_routing_rule("max-rank") == RoutingRule::MaxRank);
  EXPECT_ERROR(parse_routing_rule("biased"), "edgemoe.routing", "exact, cache-prior or max-rank", "'biased'");
  // the store's residency snapshot: resident and in-flight experts of one layer
  TestBundle b = make_bundle(g_root / "routing", {{4, 16, 24}, {4, 16, 24}});
  ExpertStore s(load_manifest(b.dir), opts(0));
  {
    ExpertStore::Pin p = s.acquire(1, 2);
    CHECK(blob_ok(p));
  }
  std::vector<uint8_t> m(4, 9);
  s.residency(1, m.data(), 4);
  CHECK((m == std::vector<uint8_t>{0, 0, 1, 0}));
  s.residency(0, m.data(), 4);
  CHECK((m == std::vector<uint8_t>{0, 0, 0, 0}));
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"exact_is_onnx_topk", test_exact_is_onnx_topk},
      {"cache_prior", test_cache_prior},
      {"max_rank", test_max_rank},
      {"parse_and_residency", test_parse_and_residency},
  };
  return run_tests("test_routing", tests);
}
