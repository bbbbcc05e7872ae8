// The plan of one OffloadedExpert call: (token, slot) pairs grouped by expert and the order in which the
// experts are acquired, plus the scratch memory of the computation, reused from call to call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "edgemoe/arena.h"

namespace edgemoe {

struct MoePlan {
  // Builds the grouping from topk indices idx [T, K] (-1 = no expert). Throws edgemoe::Error (message
  // prefixed by where()) for an index outside [0, E) other than -1.
  void build(const int64_t* idx, int64_t T, int64_t K, int64_t E, const std::function<std::string()>& where);
  // Access order: the used experts resident at the start of the call in ascending id, then the others in
  // ascending id (docs/op-contract.md, "Access order").
  void order_by_residency(const std::function<bool(int32_t)>& resident);
  // Removes the experts `drop` selects from the access order (skipped experts: not acquired, not computed).
  void drop_from_order(const std::function<bool(int32_t)>& drop);

  int64_t count(int32_t e) const { return count_[static_cast<size_t>(e) + 1]; }
  int64_t first_pair(int32_t e) const { return start_[static_cast<size_t>(e)]; }
  int64_t pair_token(int64_t p) const { return pair_token_[static_cast<size_t>(p)]; }
  int64_t pair_of(int64_t t, int64_t k) const { return pair_of_[static_cast<size_t>(t * K_ + k)]; }
  int64_t pairs() const { return pairs_; }
  int64_t max_count() const { return max_n_; }
  const std::vector<int32_t>& order() const { return order_; }

 private:
  int64_t E_ = 0, K_ = 0, pairs_ = 0, max_n_ = 0;
  std::vector<int64_t> count_, start_, fill_, pair_token_, pair_of_;
  std::vector<int32_t> order_, cold_;
};

// Float scratch in its own anonymous mapping: grows on demand, and is unmapped after a call that needed
// more than kScratchKeepBytes (a long prefill), so the process keeps no prefill-sized heap behind it.
class FloatScratch {
 public:
  static constexpr size_t kScratchKeepBytes = size_t{4} << 20;
  float* get(size_t floats);  // contents undefined
  void trim() noexcept {
    if (mem_.size() > kScratchKeepBytes) mem_.reset();
  }
  size_t bytes() const { return mem_.size(); }

 private:
  MappedBuffer mem_;
};

}  // namespace edgemoe
