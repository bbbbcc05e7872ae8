#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"

namespace edgemoe {

const std::vector<PolicyInfo>& policy_registry() {
  static const std::vector<PolicyInfo> table = {
      {"lru", "evict the least recently used expert", make_lru_policy},
      {"lfu", "evict the least frequently used expert (uses since the store opened), then the oldest",
       make_lfu_policy},
      {"edgemoe", "EdgeMoE: evict the lowest frequency / forward layer distance (experts of the layers that run "
                  "soonest stay); frequency from edgemoe.frequencies if given, else uses",
       make_edgemoe_policy},
      {"hobbit", "HOBBIT: evict the lowest w_lru*R/T + w_lfu*F/T + w_lhu*H/T + w_fld*(1 - (d-1)/L) "
                 "(edgemoe.policy_weights)",
       make_hobbit_policy},
      {"pinned", "the edgemoe.pin_experts most frequent experts of edgemoe.frequencies are never evicted; the rest "
                 "LRU",
       make_pinned_policy},
      {"none", "no cache: every use reads its expert from storage", nullptr},
  };
  return table;
}

std::string policy_names() {
  std::string s;
  for (const auto& p : policy_registry()) s += (s.empty() ? "" : ", ") + std::string(p.name);
  return s;
}

const PolicyInfo& find_policy(const std::string& name) {
  for (const auto& p : policy_registry())
    if (name == p.name) return p;
  throw Error("edgemoe.policy: expected one of " + policy_names() + ", found '" + name + "'");
}

}  // namespace edgemoe
