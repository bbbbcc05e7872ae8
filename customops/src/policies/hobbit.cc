// HOBBIT's multidimensional priority: p = w_lru*R/T + w_lfu*F/T + w_lhu*H/T + w_fld*(1 - (d - 1)/L), evict
// the lowest. R = step of the last use, F = uses, H = high-precision uses, T = current step, d = forward
// layer distance in [1, L]. Records are kept since the store opened (the op does not see sequences).
// This file is compiled with -ffp-contract=off: the score must round exactly like the Python simulator's.
#include "edgemoe/policy.h"

namespace edgemoe {
namespace {
class HobbitPolicy final : public EvictionPolicy {
 public:
  explicit HobbitPolicy(HobbitWeights w) : w_(w) {}
  const char* name() const override { return "hobbit"; }
  bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext& ctx) const override {
    const double sa = score(a, ctx), sb = score(b, ctx);
    if (sa != sb) return sa < sb;
    return a.usage.last_use < b.usage.last_use;
  }

 private:
  double score(const Candidate& c, const PolicyContext& ctx) const {
    const double T = static_cast<double>(ctx.step > 0 ? ctx.step : 1);
    const double L = static_cast<double>(ctx.num_layers);
    const double R = static_cast<double>(c.usage.last_step), F = static_cast<double>(c.usage.uses),
                 H = static_cast<double>(c.usage.hp_uses), d = static_cast<double>(c.distance);
    return ((w_.lru * (R / T) + w_.lfu * (F / T)) + w_.lhu * (H / T)) + w_.fld * (1.0 - (d - 1.0) / L);
  }
  HobbitWeights w_;
};
}  // namespace

std::unique_ptr<EvictionPolicy> make_hobbit_policy(const PolicyParams& p) {
  return std::make_unique<HobbitPolicy>(p.weights);
}

}  // namespace edgemoe
