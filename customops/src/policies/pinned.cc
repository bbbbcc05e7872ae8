// The N most frequent experts (edgemoe.frequencies) are never evicted while any other candidate remains;
// everything else is LRU. N = edgemoe.pin_experts, by default as many of the most frequent as fit in
// budget - largest blob (so one slot always stays for the rest and the cache never deadlocks).
#include <algorithm>
#include <set>

#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"

namespace edgemoe {
namespace {
class PinnedPolicy final : public EvictionPolicy {
 public:
  explicit PinnedPolicy(std::set<ExpertKey> pinned) : pinned_(std::move(pinned)) {}
  const char* name() const override { return "pinned"; }
  bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext&) const override {
    const bool pa = pinned_.count(a.key) != 0, pb = pinned_.count(b.key) != 0;
    if (pa != pb) return pb;  // unpinned first
    return a.usage.last_use < b.usage.last_use;
  }

 private:
  std::set<ExpertKey> pinned_;
};
}  // namespace

std::unique_ptr<EvictionPolicy> make_pinned_policy(const PolicyParams& p) {
  if (!p.frequencies)
    throw Error("edgemoe.policy: 'pinned' needs expert frequencies: set edgemoe.frequencies to a JSON file "
                "{\"expert_frequency\": [[...], ...]}");
  const Manifest& m = *p.manifest;
  std::vector<std::pair<double, ExpertKey>> ranked;
  for (const auto& layer : m.experts)
    for (const auto& r : layer) ranked.push_back({p.frequencies->at({r.layer, r.expert}), {r.layer, r.expert}});
  std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {  // a total order: keys are unique
    if (a.first != b.first) return a.first > b.first;
    return a.second < b.second;
  });
  const uint64_t largest = m.largest_length();
  const uint64_t room = p.budget > largest ? p.budget - largest : 0;
  std::set<ExpertKey> pinned;
  uint64_t bytes = 0;
  if (p.pin_experts) {
    const int64_t n = *p.pin_experts;
    if (n < 0 || n > static_cast<int64_t>(ranked.size()))
      throw Error("edgemoe.pin_experts: expected an integer in [0, " + std::to_string(ranked.size()) +
                  "] (experts in the store), found " + std::to_string(n));
    for (int64_t i = 0; i < n; ++i) {
      bytes += m.record(ranked[static_cast<size_t>(i)].second.layer, ranked[static_cast<size_t>(i)].second.expert).length;
      pinned.insert(ranked[static_cast<size_t>(i)].second);
    }
    if (bytes > room)
      throw Error("edgemoe.pin_experts: the " + std::to_string(n) + " most frequent experts need " +
                  std::to_string(bytes) + " bytes, expected at most budget - largest blob = " + std::to_string(room) +
                  " bytes (one blob's room must stay for the other experts)");
  } else {
    for (const auto& kv : ranked) {
      const uint64_t len = m.record(kv.second.layer, kv.second.expert).length;
      if (bytes + len > room) break;
      bytes += len;
      pinned.insert(kv.second);
    }
  }
  return std::make_unique<PinnedPolicy>(std::move(pinned));
}

}  // namespace edgemoe
