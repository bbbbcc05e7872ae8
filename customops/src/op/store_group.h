// One per registration: the expert store shared by every kernel created from that SessionOptions. Kernels
// hold it by shared_ptr; the group only weakly, so the store dies with the last session and is reopened by
// the next.
#pragma once
#include <memory>
#include <mutex>
#include <string>

#include "edgemoe/config.h"
#include "edgemoe/store.h"

namespace edgemoe {

class StoreGroup {
 public:
  explicit StoreGroup(RuntimeConfig cfg) : cfg_(std::move(cfg)) {}
  // The store of `manifest_rel` (opened on first use). Throws edgemoe::Error (one registration serves one
  // manifest; bundle and store errors).
  std::shared_ptr<ExpertStore> get(const std::string& manifest_rel);

 private:
  RuntimeConfig cfg_;
  std::mutex mu_;
  std::weak_ptr<ExpertStore> store_;
  std::string manifest_;
};

}  // namespace edgemoe
