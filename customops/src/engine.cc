#include "edgemoe/engine.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <mutex>
#include <tuple>

#include "edgemoe/warm_start.h"

namespace edgemoe {

namespace {
std::optional<RoutingProfile> open_profile(const Manifest& m, const PrefetchOptions& o,
                                          bool derive_thresholds_from_profile) {
  const bool needed = o.predictor != "none" || o.warm_start == "profile" || derive_thresholds_from_profile;
  if (!needed) return std::nullopt;
  std::string path = o.profile;
  if (path.empty()) {
    const std::filesystem::path def = m.bundle_dir / "profile.json";
    std::error_code ec;
    if (!std::filesystem::exists(def, ec)) return std::nullopt;
    path = def.string();
  } else if (std::filesystem::path(path).is_relative()) {
    path = (m.bundle_dir / path).string();
  }
  return load_profile(path, m);
}

std::mutex& registry_mu() {
  static std::mutex mu;
  return mu;
}
std::map<std::string, std::weak_ptr<Engine>>& registry() {
  static std::map<std::string, std::weak_ptr<Engine>> r;
  return r;
}
}  // namespace

Engine::Engine(Manifest manifest, const RuntimeConfig& cfg) {
  const PrefetchOptions& po = cfg.prefetch;
  precision_ = cfg.precision;
  const bool derive = precision_.mode == MissPrecision::Dynamic && !precision_.thresholds_given;
  std::optional<RoutingProfile> profile = open_profile(manifest, po, derive);
  if (derive && profile) std::tie(precision_.t1, precision_.t2) = derive_thresholds(*profile);
  std::vector<ExpertKey> warm;
  if (!po.warm_start.empty()) {
    if (po.warm_start == "profile" && !profile)
      throw Error("edgemoe.warm_start: 'profile' needs the bundle's routing profile, but there is none (expected " +
                  (manifest.bundle_dir / "profile.json").string() +
                  "; make one with: edgemoe-profile BUNDLE --corpus TEXT)");
    warm = warm_set(po.warm_start, manifest, profile ? &*profile : nullptr);
    if (cfg.precision.mode == MissPrecision::Exact)  // exact never reads a twin, not even to warm up
      warm.erase(std::remove_if(warm.begin(), warm.end(), [](const ExpertKey& k) { return k.variant == kTwin; }),
                 warm.end());
  }
  StoreOptions so = cfg.store;
  // "" = everything fits (twins too); a percentage is of the primaries' bytes with twins, else of the store.
  so.budget_bytes = cfg.budget.empty() ? manifest.store_size
                                       : parse_budget(cfg.budget, manifest.has_twins() ? manifest.primary_bytes()
                                                                                       : manifest.store_size);
  const size_t num_layers = manifest.layers.size();
  store_ = std::make_unique<ExpertStore>(std::move(manifest), so);
  router_ = std::make_unique<CacheAwareRouter>(cfg.routing, num_layers);
  {
    const std::shared_ptr<StoreStats>& st = store_->stats();
    std::lock_guard<std::mutex> lk(st->mu);
    st->routing = routing_rule_name(cfg.routing.rule);
    st->miss_precision = precision_.mode == MissPrecision::Dynamic ? "dynamic" : "exact";
    st->threshold_t1 = precision_.mode == MissPrecision::Dynamic ? precision_.t1 : 0.0;
    st->threshold_t2 = precision_.mode == MissPrecision::Dynamic ? precision_.t2 : 0.0;
    size_t twins = 0;
    for (const auto& l : store_->manifest().twins)
      for (const auto& t : l) twins += t.has_value();
    st->num_twins = twins;
  }
  if (po.predictor != "none")
    prefetcher_ = std::make_unique<Prefetcher>(*store_, po, std::move(profile), precision_);
  if (!warm.empty()) warm_start(*store_, warm);
}

Engine::~Engine() = default;

std::shared_ptr<Engine> find_engine(const std::string& store_id) {
  std::lock_guard<std::mutex> lk(registry_mu());
  auto it = registry().find(store_id);
  return it == registry().end() ? nullptr : it->second.lock();
}

void publish_engine(const std::string& store_id, const std::shared_ptr<Engine>& e) {
  std::lock_guard<std::mutex> lk(registry_mu());
  for (auto it = registry().begin(); it != registry().end();) it = it->second.expired() ? registry().erase(it) : std::next(it);
  registry()[store_id] = e;
}

}  // namespace edgemoe
