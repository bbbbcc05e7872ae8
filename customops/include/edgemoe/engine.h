// One bundle's runtime: the expert store, the prefetcher that feeds it and the cache-aware router, built from a RuntimeConfig, and
// the warm start (warm_start.h) applied when it opens. Kernels of both ops share one Engine per registration.
#pragma once
#include <memory>
#include <string>

#include "edgemoe/config.h"
#include "edgemoe/prefetcher.h"
#include "edgemoe/routing.h"
#include "edgemoe/store.h"

namespace edgemoe {

class Engine {
 public:
  // Opens the store, loads the routing profile (cfg.prefetch.profile, else <bundle>/profile.json if present)
  // and starts the warm start. Throws edgemoe::Error.
  Engine(Manifest manifest, const RuntimeConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  ExpertStore& store() { return *store_; }
  // Null when edgemoe.predictor is none.
  Prefetcher* prefetcher() { return prefetcher_.get(); }
  // The routing rule of the CacheAwareTopK nodes (edgemoe.routing).
  CacheAwareRouter& router() { return *router_; }
  // Miss precision in effect (edgemoe.miss_precision; the thresholds resolved against the profile).
  const PrecisionOptions& precision() const { return precision_; }

 private:
  PrecisionOptions precision_;
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<Prefetcher> prefetcher_;  // after the store: destroyed first
  std::unique_ptr<CacheAwareRouter> router_;
};

// The live engine published under a store id (null if none): what the C API's resident-set calls act on.
std::shared_ptr<Engine> find_engine(const std::string& store_id);
void publish_engine(const std::string& store_id, const std::shared_ptr<Engine>& e);

}  // namespace edgemoe
