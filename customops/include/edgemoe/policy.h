// Eviction policies of the expert cache. A policy only ranks entries: the store decides when to evict
// (to make room within the byte budget) and which entries may be evicted (resident, unpinned), and asks
// the policy for a victim among those candidates. All calls are made under the store's lock.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace edgemoe {

struct ExpertKey {
  int32_t layer = 0;
  int32_t expert = 0;
  bool operator==(const ExpertKey& o) const { return layer == o.layer && expert == o.expert; }
  bool operator!=(const ExpertKey& o) const { return !(*this == o); }
};

struct ExpertKeyHash {
  size_t operator()(const ExpertKey& k) const noexcept {
    return std::hash<uint64_t>()((static_cast<uint64_t>(static_cast<uint32_t>(k.layer)) << 32) |
                                 static_cast<uint32_t>(k.expert));
  }
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // `key` became resident (or started loading) with `bytes` bytes.
  virtual void on_insert(const ExpertKey& key, uint64_t bytes) = 0;
  // `key` was used (pinned by an acquire). Called after on_insert for a miss.
  virtual void on_access(const ExpertKey& key) = 0;
  // `key` left the cache (evicted, or its read failed).
  virtual void on_remove(const ExpertKey& key) = 0;
  // The entry to evict among `candidates` (non-empty; resident, unpinned, all previously inserted).
  // `current_layer` is the layer of the most recent acquire (for layer-aware policies), -1 before any.
  // Must return one of the candidates; std::nullopt refuses to evict (the caller then waits or gives up).
  virtual std::optional<ExpertKey> victim(const std::vector<ExpertKey>& candidates, int32_t current_layer) = 0;
};

// Least recently used: the candidate whose last on_access (or on_insert) is oldest.
class LruPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }
  void on_insert(const ExpertKey& key, uint64_t bytes) override;
  void on_access(const ExpertKey& key) override;
  void on_remove(const ExpertKey& key) override;
  std::optional<ExpertKey> victim(const std::vector<ExpertKey>& candidates, int32_t current_layer) override;

 private:
  uint64_t clock_ = 0;
  std::unordered_map<ExpertKey, uint64_t, ExpertKeyHash> last_use_;
};

// "lru" -> LruPolicy. "none" is not a policy (it disables the cache) and returns nullptr.
// Throws edgemoe::Error for an unknown name.
std::unique_ptr<EvictionPolicy> make_policy(const std::string& name);

}  // namespace edgemoe
