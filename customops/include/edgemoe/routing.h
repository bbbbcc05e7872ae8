// Cache-aware routing (docs/op-contract.md, "Cache-aware routing"): the top-k step of a router, choosing
// among the layer's experts with the expert cache in view (Mixture of Cache-Conditional Experts,
// arXiv 2412.00099). The CacheAwareTopK op runs it in place of each router's TopK / ArgMax.
//
// Rules (edgemoe.routing):
//   exact        the k largest scores, ties to the lower index: ONNX TopK (largest=1, sorted=1) bit for bit.
//   cache-prior  the true top-J, then the top k - J of z'_i = z_i + lambda * delta * m_i among the others;
//                z = the router logits (log of the scores when the scores are probabilities: the same up to a
//                per-token constant), m_i = 1 for an expert resident or being read, delta = the layer's
//                running mean of the per-token range max z - min z. J = 0 is the paper's rule.
//   max-rank     the true top-J always; the other k - J slots go to resident experts inside the true top-M,
//                in rank order, then to the best remaining ranks.
// Outputs are always the UNBIASED scores of the chosen experts (the graph renormalizes them by the family's
// own rule), in descending order of the rule's ranking. lambda = 0, J >= k or M <= J behave as exact.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace edgemoe {

enum class RoutingRule { Exact, CachePrior, MaxRank };

struct RoutingOptions {
  RoutingRule rule = RoutingRule::Exact;
  float lambda = 0.5f;  // cache-prior: bias in units of the layer's mean logit range, [0, 100]
  int32_t keep = 1;     // J: the true top experts always kept, [0, 1024]
  int32_t window = 0;   // max-rank: M, [1, 1024]; 0 = 2k
};

// "exact" | "cache-prior" | "max-rank". Throws edgemoe::Error naming edgemoe.routing.
RoutingRule parse_routing_rule(const std::string& name);
const char* routing_rule_name(RoutingRule r);

// How the scores handed to the router relate to the logits.
enum class ScoreKind { Probs, Logits };

// What one call changed (summed by the caller into the layer's counters).
struct RouteCounts {
  uint64_t selections = 0;      // T * k
  uint64_t changed = 0;         // selections that are not among the token's exact top-k
  int64_t misses_avoided = 0;   // distinct non-resident experts of the exact choice minus those of this one
};

// The ONNX TopK order: larger score first, equal scores by lower index; NaN after every number.
inline bool topk_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

class CacheAwareRouter {
 public:
  CacheAwareRouter(RoutingOptions options, size_t num_layers);

  const RoutingOptions& options() const { return options_; }
  // True when the rule can change a selection (it needs the residency mask).
  bool biased() const;

  // scores [T, E] row-major -> values [T, k] (the chosen experts' scores) and indices [T, k].
  // `resident` (E bytes, 1 = resident or being read) may be null when !biased(). counts may be null.
  // Thread-safe; updates the layer's running logit range (cache-prior).
  void route(int32_t layer, ScoreKind kind, const float* scores, int64_t T, int64_t E, int64_t k,
             const uint8_t* resident, float* values, int64_t* indices, RouteCounts* counts);

  // The layer's current mean logit range (0 before its first token).
  double logit_range(int32_t layer) const;

 private:
  struct LayerState {
    double range = 0;  // running mean of per-token max z - min z
    uint64_t tokens = 0;
  };
  double update_range(int32_t layer, ScoreKind kind, const float* scores, int64_t T, int64_t E);

  RoutingOptions options_;
  mutable std::mutex mu_;
  std::vector<LayerState> layers_;
};

}  // namespace edgemoe
