#include <algorithm>
#include <cmath>
#include <numeric>

#include "edgemoe/manifest.h"
#include "edgemoe/routing.h"

namespace edgemoe {

namespace {
// The running mean of the logit range becomes an exponential average over about this many tokens.
constexpr uint64_t kRangeWindow = 1024;
// log() of a probability that underflowed to 0 (softmax of a very negative logit) is taken at this floor.
constexpr float kMinProb = 1e-38f;

double logit_of(ScoreKind kind, float s) {
  return kind == ScoreKind::Probs ? std::log(static_cast<double>(std::max(s, kMinProb))) : static_cast<double>(s);
}
}  // namespace

RoutingRule parse_routing_rule(const std::string& name) {
  if (name == "exact") return RoutingRule::Exact;
  if (name == "cache-prior") return RoutingRule::CachePrior;
  if (name == "max-rank") return RoutingRule::MaxRank;
  throw Error("edgemoe.routing: expected exact, cache-prior or max-rank, found '" + name + "'");
}

const char* routing_rule_name(RoutingRule r) {
  switch (r) {
    case RoutingRule::CachePrior:
      return "cache-prior";
    case RoutingRule::MaxRank:
      return "max-rank";
    case RoutingRule::Exact:
      break;
  }
  return "exact";
}

CacheAwareRouter::CacheAwareRouter(RoutingOptions options, size_t num_layers)
    : options_(options), layers_(num_layers) {}

bool CacheAwareRouter::biased() const {
  switch (options_.rule) {
    case RoutingRule::CachePrior:
      return options_.lambda > 0;
    case RoutingRule::MaxRank:
      return true;  // whether J < k and M > J is known per call (k)
    case RoutingRule::Exact:
      break;
  }
  return false;
}

double CacheAwareRouter::logit_range(int32_t layer) const {
  std::lock_guard<std::mutex> lk(mu_);
  const size_t l = static_cast<size_t>(layer);
  return layer >= 0 && l < layers_.size() ? layers_[l].range : 0.0;
}

double CacheAwareRouter::update_range(int32_t layer, ScoreKind kind, const float* scores, int64_t T, int64_t E) {
  std::lock_guard<std::mutex> lk(mu_);
  const size_t l = static_cast<size_t>(layer);
  if (layer < 0 || l >= layers_.size()) return 0.0;
  LayerState& st = layers_[l];
  for (int64_t t = 0; t < T; ++t) {
    const float* row = scores + t * E;
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      if (row[e] != row[e]) continue;  // NaN
      const double z = logit_of(kind, row[e]);
      lo = std::min(lo, z);
      hi = std::max(hi, z);
    }
    if (!(hi >= lo) || !std::isfinite(hi - lo)) continue;  // no finite score in the row
    st.tokens += 1;
    st.range += ((hi - lo) - st.range) / static_cast<double>(std::min(st.tokens, kRangeWindow));
  }
  return st.range;
}

void CacheAwareRouter::route(int32_t layer, ScoreKind kind, const float* scores, int64_t T, int64_t E, int64_t k,
                             const uint8_t* resident, float* values, int64_t* indices, RouteCounts* counts) {
  if (T <= 0 || k <= 0) return;
  const RoutingRule rule = options_.rule;
  const int64_t keep = std::min<int64_t>(options_.keep, k);
  const int64_t window = std::min<int64_t>(options_.window > 0 ? options_.window : 2 * k, E);
  const bool prior = rule == RoutingRule::CachePrior && options_.lambda > 0 && resident != nullptr && keep < k;
  const bool rank = rule == RoutingRule::MaxRank && resident != nullptr && keep < k && window > keep;
  const double bias = prior ? static_cast<double>(options_.lambda) * update_range(layer, kind, scores, T, E) : 0.0;
  const bool counting = counts != nullptr && resident != nullptr;

  std::vector<int64_t> order(static_cast<size_t>(E)), chosen(static_cast<size_t>(k)), by_key;
  std::vector<double> key;
  std::vector<uint8_t> taken;
  if (prior) key.resize(static_cast<size_t>(E));
  std::vector<uint8_t> need_exact, need_chosen;
  if (counting) {
    need_exact.assign(static_cast<size_t>(E), 0);
    need_chosen.assign(static_cast<size_t>(E), 0);
  }
  // how much of the true order a row needs: the top-M (max-rank), the top-J and top-k (cache-prior: the kept
  // ones and the exact choice the counts compare with)
  const int64_t ranked = rank ? std::max(window, k) : k;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = scores + t * E;
    auto exact_before = [row](int64_t a, int64_t b) { return topk_before(row[a], a, row[b], b); };
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + ranked, order.end(), exact_before);
    if (prior) {
      for (int64_t e = 0; e < E; ++e) {
        const double z = row[e] != row[e] ? -INFINITY : logit_of(kind, row[e]);
        key[static_cast<size_t>(e)] = z + (resident[e] ? bias : 0.0);
      }
      for (int64_t r = 0; r < keep; ++r) key[static_cast<size_t>(order[static_cast<size_t>(r)])] = INFINITY;
      by_key = order;
      std::partial_sort(by_key.begin(), by_key.begin() + k, by_key.end(), [&](int64_t a, int64_t b) {
        const double ka = key[static_cast<size_t>(a)], kb = key[static_cast<size_t>(b)];
        if (ka != kb) return ka > kb;
        return exact_before(a, b);
      });
      std::copy(by_key.begin(), by_key.begin() + k, chosen.begin());
    } else if (rank) {
      // the true top-J, then residents of ranks J..M-1 in rank order, then the best remaining ranks
      int64_t n = 0;
      taken.assign(static_cast<size_t>(ranked), 0);
      for (int64_t r = 0; r < keep; ++r, ++n) {
        chosen[static_cast<size_t>(n)] = order[static_cast<size_t>(r)];
        taken[static_cast<size_t>(r)] = 1;
      }
      for (int64_t r = keep; r < window && n < k; ++r) {
        if (resident[order[static_cast<size_t>(r)]]) {
          chosen[static_cast<size_t>(n++)] = order[static_cast<size_t>(r)];
          taken[static_cast<size_t>(r)] = 1;
        }
      }
      for (int64_t r = keep; n < k; ++r) {
        if (!taken[static_cast<size_t>(r)]) chosen[static_cast<size_t>(n++)] = order[static_cast<size_t>(r)];
      }
      std::sort(chosen.begin(), chosen.end(), exact_before);  // rank order
    } else {
      std::copy(order.begin(), order.begin() + k, chosen.begin());
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = chosen[static_cast<size_t>(j)];
      indices[t * k + j] = e;
      values[t * k + j] = row[e];
    }
    if (counting) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = chosen[static_cast<size_t>(j)];
        need_chosen[static_cast<size_t>(e)] = 1;
        need_exact[static_cast<size_t>(order[static_cast<size_t>(j)])] = 1;
        bool in_exact = false;
        for (int64_t i = 0; i < k && !in_exact; ++i) in_exact = order[static_cast<size_t>(i)] == e;
        if (!in_exact) counts->changed += 1;
      }
    }
  }
  if (counts != nullptr) counts->selections += static_cast<uint64_t>(T * k);
  if (counting) {
    int64_t exact_misses = 0, chosen_misses = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (resident[e]) continue;
      exact_misses += need_exact[static_cast<size_t>(e)];
      chosen_misses += need_chosen[static_cast<size_t>(e)];
    }
    counts->misses_avoided += exact_misses - chosen_misses;
  }
}

}  // namespace edgemoe
