// EdgeMoE's eviction score with the forward layer distance: keep = f / d, evict the lowest. The paper prints
// L = -f / ((S - i + I) mod S), whose distance runs backwards, while its prose keeps "a layer that is going to
// be executed soon"; we implement the prose (as HOBBIT does): d = ((i - I - 1) mod S) + 1 in [1, S].
#include "edgemoe/policy.h"

namespace edgemoe {
namespace {
class EdgeMoePolicy final : public EvictionPolicy {
 public:
  explicit EdgeMoePolicy(const FrequencyTable* f) : freq_(f) {}
  const char* name() const override { return "edgemoe"; }
  bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext&) const override {
    const double sa = frequency(a) / static_cast<double>(a.distance);
    const double sb = frequency(b) / static_cast<double>(b.distance);
    if (sa != sb) return sa < sb;
    return a.usage.last_use < b.usage.last_use;
  }

 private:
  double frequency(const Candidate& c) const {
    return freq_ ? freq_->at(c.key) : static_cast<double>(c.usage.uses);
  }
  const FrequencyTable* freq_;
};
}  // namespace

std::unique_ptr<EvictionPolicy> make_edgemoe_policy(const PolicyParams& p) {
  return std::make_unique<EdgeMoePolicy>(p.frequencies);
}

}  // namespace edgemoe
