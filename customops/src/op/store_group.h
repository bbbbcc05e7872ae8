// One per registration: the engine (expert store + prefetcher) shared by every kernel created from that
// SessionOptions. Kernels hold it by shared_ptr; the group only weakly, so the engine dies with the last
// session and is reopened by the next.
#pragma once
#include <memory>
#include <mutex>
#include <string>

#include "edgemoe/config.h"
#include "edgemoe/engine.h"

namespace edgemoe {

class StoreGroup {
 public:
  explicit StoreGroup(RuntimeConfig cfg) : cfg_(std::move(cfg)) {}
  // The engine of `manifest_rel` (opened on first use). Throws edgemoe::Error (one registration serves one
  // manifest; bundle, profile and store errors).
  std::shared_ptr<Engine> get(const std::string& manifest_rel);

 private:
  RuntimeConfig cfg_;
  std::mutex mu_;
  std::weak_ptr<Engine> engine_;
  std::string manifest_;
};

}  // namespace edgemoe
