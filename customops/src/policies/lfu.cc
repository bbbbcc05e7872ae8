#include "edgemoe/policy.h"

namespace edgemoe {
namespace {
class LfuPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lfu"; }
  bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext&) const override {
    if (a.usage.uses != b.usage.uses) return a.usage.uses < b.usage.uses;
    return a.usage.last_use < b.usage.last_use;
  }
};
}  // namespace

std::unique_ptr<EvictionPolicy> make_lfu_policy(const PolicyParams&) { return std::make_unique<LfuPolicy>(); }

}  // namespace edgemoe
