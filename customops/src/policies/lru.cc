#include "edgemoe/policy.h"

namespace edgemoe {
namespace {
class LruPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }
  bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext&) const override {
    return a.usage.last_use < b.usage.last_use;
  }
};
}  // namespace

std::unique_ptr<EvictionPolicy> make_lru_policy(const PolicyParams&) { return std::make_unique<LruPolicy>(); }

}  // namespace edgemoe
