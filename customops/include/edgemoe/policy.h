// Eviction policies of the expert cache (docs/op-contract.md, "Cache policies"). A policy only ranks: the
// store decides when to evict (to make room within the byte budget) and which entries may go (resident,
// fully read, unpinned; for a prefetch also not protected at its confidence), keeps the usage history every
// policy reads (UsageRecord), and asks the policy for the next victim among those candidates. A policy is
// a pure function of the candidates' records and the context, so the Python simulator
// (edgemoe_ort/runtime/cachesim.py) reproduces the op's hits, misses and evictions exactly.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace edgemoe {

struct Manifest;

// One cached blob: (layer, expert) and which copy of it (variant 0 the primary, 1 its low-bit twin).
struct ExpertKey {
  int32_t layer = 0;
  int32_t expert = 0;
  int32_t variant = 0;
  bool operator==(const ExpertKey& o) const {
    return layer == o.layer && expert == o.expert && variant == o.variant;
  }
  bool operator!=(const ExpertKey& o) const { return !(*this == o); }
  bool operator<(const ExpertKey& o) const {
    if (layer != o.layer) return layer < o.layer;
    return expert != o.expert ? expert < o.expert : variant < o.variant;
  }
  ExpertKey primary() const { return ExpertKey{layer, expert, 0}; }
};

struct ExpertKeyHash {
  size_t operator()(const ExpertKey& k) const noexcept {
    return std::hash<uint64_t>()((static_cast<uint64_t>(static_cast<uint32_t>(k.layer)) << 32) ^
                                 (static_cast<uint64_t>(static_cast<uint32_t>(k.expert)) << 1) ^
                                 static_cast<uint64_t>(static_cast<uint32_t>(k.variant)));
  }
};

// What the store remembers of an expert since it opened (kept across evictions).
struct UsageRecord {
  uint64_t uses = 0;       // acquires (hits + misses)
  uint64_t hp_uses = 0;    // acquires served at high precision (a primary's; a twin's stay 0)
  uint64_t last_use = 0;   // access clock at the latest insert or acquire (unique per expert; 0 = never)
  uint64_t last_step = 0;  // forward pass (step) of the latest acquire
};

// One eviction candidate as a policy sees it.
struct Candidate {
  ExpertKey key;
  uint64_t bytes = 0;
  int32_t distance = 0;         // forward layer distance in [1, L]: 1 = the next layer, L = the running one
  bool from_prefetch = false;   // its read was started by a prefetch
  bool used = false;            // acquired since it was read
  UsageRecord usage;
};

struct PolicyContext {
  int32_t current_layer = -1;  // layer of the call in progress (-1 before any call)
  int32_t num_layers = 1;      // L: MoE layers of the manifest
  uint64_t step = 0;           // forward passes so far (T); a call of a layer <= the previous call's starts one
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // True if `a` should be evicted before `b` (a strict weak order; candidates with equal scores are ordered
  // by their unique last_use, oldest first, so the choice is deterministic).
  virtual bool evict_before(const Candidate& a, const Candidate& b, const PolicyContext& ctx) const = 0;
};

// Per-expert frequencies from a file (edgemoe.frequencies): {"expert_frequency": [[f_0_0, ...], ...]}, one
// list per manifest layer, one non-negative number per expert. Validated against the manifest.
struct FrequencyTable {
  std::string path;
  std::vector<std::vector<double>> f;  // [layer][expert]
  double at(const ExpertKey& k) const { return f[static_cast<size_t>(k.layer)][static_cast<size_t>(k.expert)]; }
};
// Throws edgemoe::Error naming the file and the field.
FrequencyTable load_frequencies(const std::string& path, const Manifest& manifest);

// HOBBIT's weights (edgemoe.policy_weights = "lru=0.25,lfu=0.25,lhu=0.25,fld=0.25").
struct HobbitWeights {
  double lru = 0.25, lfu = 0.25, lhu = 0.25, fld = 0.25;
};
HobbitWeights parse_policy_weights(const std::string& spec);  // throws edgemoe::Error

struct PolicyParams {
  const Manifest* manifest = nullptr;
  uint64_t budget = 0;
  const FrequencyTable* frequencies = nullptr;  // null = none given
  HobbitWeights weights;
  std::optional<int64_t> pin_experts;  // pinned: N (default: as many as fit in budget - largest blob)
};

// The policy registry: one row per policy name.
struct PolicyInfo {
  const char* name;
  const char* doc;
  // nullptr for "none" (no cache). Throws edgemoe::Error for bad parameters.
  std::unique_ptr<EvictionPolicy> (*make)(const PolicyParams&);
};
const std::vector<PolicyInfo>& policy_registry();
// "lru, lfu, edgemoe, hobbit, pinned, none"
std::string policy_names();
// Throws edgemoe::Error ("edgemoe.policy: expected one of ..., found ...") for an unknown name.
const PolicyInfo& find_policy(const std::string& name);

// Implementations (src/policies/*.cc).
std::unique_ptr<EvictionPolicy> make_lru_policy(const PolicyParams&);
std::unique_ptr<EvictionPolicy> make_lfu_policy(const PolicyParams&);
std::unique_ptr<EvictionPolicy> make_edgemoe_policy(const PolicyParams&);
std::unique_ptr<EvictionPolicy> make_hobbit_policy(const PolicyParams&);
std::unique_ptr<EvictionPolicy> make_pinned_policy(const PolicyParams&);

}  // namespace edgemoe
