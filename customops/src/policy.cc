#include "edgemoe/policy.h"

#include <limits>

#include "edgemoe/manifest.h"

namespace edgemoe {

void LruPolicy::on_insert(const ExpertKey& key, uint64_t /*bytes*/) { last_use_[key] = ++clock_; }

void LruPolicy::on_access(const ExpertKey& key) { last_use_[key] = ++clock_; }

void LruPolicy::on_remove(const ExpertKey& key) { last_use_.erase(key); }

std::optional<ExpertKey> LruPolicy::victim(const std::vector<ExpertKey>& candidates, int32_t /*current_layer*/) {
  std::optional<ExpertKey> best;
  uint64_t best_t = std::numeric_limits<uint64_t>::max();
  for (const auto& k : candidates) {
    auto it = last_use_.find(k);
    const uint64_t t = it == last_use_.end() ? 0 : it->second;
    if (!best || t < best_t) {
      best = k;
      best_t = t;
    }
  }
  return best;
}

std::unique_ptr<EvictionPolicy> make_policy(const std::string& name) {
  if (name == "lru") return std::make_unique<LruPolicy>();
  if (name == "none") return nullptr;
  throw Error("edgemoe.policy: expected one of lru, none, found '" + name + "'");
}

}  // namespace edgemoe
