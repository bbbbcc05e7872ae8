#include "edgemoe/moe_plan.h"

#include <algorithm>

#include "edgemoe/manifest.h"

namespace edgemoe {

void MoePlan::build(const int64_t* idx, int64_t T, int64_t K, int64_t E, const std::function<std::string()>& where) {
  E_ = E;
  K_ = K;
  count_.assign(static_cast<size_t>(E) + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = idx[t * K + k];
      if (e == -1) continue;
      if (e < 0 || e >= E) {
        throw Error(where() + ": topk_indices[" + std::to_string(t) + ", " + std::to_string(k) +
                    "]: expected an expert in [0, " + std::to_string(E) + ") or -1, found " + std::to_string(e));
      }
      ++count_[static_cast<size_t>(e) + 1];
    }
  }
  start_.assign(count_.size(), 0);
  for (size_t e = 1; e < count_.size(); ++e) start_[e] = start_[e - 1] + count_[e];
  pairs_ = start_.back();
  pair_token_.resize(static_cast<size_t>(pairs_));
  pair_of_.assign(static_cast<size_t>(T * K), -1);
  fill_.assign(start_.begin(), start_.end() - 1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = idx[t * K + k];
      if (e < 0) continue;
      const int64_t p = fill_[static_cast<size_t>(e)]++;
      pair_token_[static_cast<size_t>(p)] = t;
      pair_of_[static_cast<size_t>(t * K + k)] = p;
    }
  }
  max_n_ = 0;
  for (int64_t e = 0; e < E; ++e) max_n_ = std::max(max_n_, count_[static_cast<size_t>(e) + 1]);
}

void MoePlan::order_by_residency(const std::function<bool(int32_t)>& resident) {
  order_.clear();
  cold_.clear();
  for (int64_t e = 0; e < E_; ++e) {
    if (count_[static_cast<size_t>(e) + 1] == 0) continue;
    (resident(static_cast<int32_t>(e)) ? order_ : cold_).push_back(static_cast<int32_t>(e));
  }
  order_.insert(order_.end(), cold_.begin(), cold_.end());
}

void MoePlan::drop_from_order(const std::function<bool(int32_t)>& drop) {
  order_.erase(std::remove_if(order_.begin(), order_.end(), [&](int32_t e) { return drop(e); }), order_.end());
}

float* FloatScratch::get(size_t floats) {
  const size_t bytes = std::max<size_t>(floats, 1) * sizeof(float);
  if (mem_.size() < bytes) {
    mem_.reset();  // unmap first: never two generations mapped at once
    mem_ = MappedBuffer(bytes, ArenaOptions{});
  }
  return reinterpret_cast<float*>(mem_.data());
}

}  // namespace edgemoe
