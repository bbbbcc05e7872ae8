#include "edgemoe/stats.h"

#include <map>
#include <nlohmann/json.hpp>

namespace edgemoe {

void StoreStats::add_resident(uint64_t delta) {
  const uint64_t now = resident_bytes.fetch_add(delta, std::memory_order_relaxed) + delta;
  uint64_t peak = peak_resident_bytes.load(std::memory_order_relaxed);
  while (now > peak && !peak_resident_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void StoreStats::sub_resident(uint64_t delta) { resident_bytes.fetch_sub(delta, std::memory_order_relaxed); }

void StoreStats::reset() {
  for (auto* c : {&hits, &misses, &reads, &bytes_read, &read_ns, &stall_ns, &evictions, &checksums_verified,
                  &prefetch_issued, &prefetch_dropped, &prefetch_hits, &prefetch_late, &prefetch_wasted, &calls,
                  &budget_waits, &throttle_ns, &prefetch_cancelled, &prefetch_promoted, &steps}) {
    c->store(0, std::memory_order_relaxed);
  }
  peak_resident_bytes.store(resident_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
  peak_arena_bytes.store(arena_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

std::string StoreStats::to_json() const {
  nlohmann::ordered_json j;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  j["hits"] = ld(hits);
  j["misses"] = ld(misses);
  j["reads"] = ld(reads);
  j["bytes_read"] = ld(bytes_read);
  j["read_s"] = static_cast<double>(ld(read_ns)) * 1e-9;
  j["stall_s"] = static_cast<double>(ld(stall_ns)) * 1e-9;
  j["evictions"] = ld(evictions);
  j["resident_bytes"] = ld(resident_bytes);
  j["peak_resident_bytes"] = ld(peak_resident_bytes);
  j["checksums_verified"] = ld(checksums_verified);
  j["prefetch_issued"] = ld(prefetch_issued);
  j["prefetch_dropped"] = ld(prefetch_dropped);
  j["prefetch_hits"] = ld(prefetch_hits);
  j["prefetch_late"] = ld(prefetch_late);
  j["prefetch_wasted"] = ld(prefetch_wasted);
  j["calls"] = ld(calls);
  j["budget_waits"] = ld(budget_waits);
  j["throttle_s"] = static_cast<double>(ld(throttle_ns)) * 1e-9;
  j["prefetch_cancelled"] = ld(prefetch_cancelled);
  j["prefetch_promoted"] = ld(prefetch_promoted);
  j["steps"] = ld(steps);
  j["arena_bytes"] = ld(arena_bytes);
  j["peak_arena_bytes"] = ld(peak_arena_bytes);
  std::lock_guard<std::mutex> lk(mu);
  j["budget_bytes"] = budget_bytes;
  j["store_bytes"] = store_bytes;
  j["num_experts"] = num_experts;
  j["policy"] = policy;
  j["io_mode"] = io_mode;
  j["io_threads"] = io_threads;
  j["direct_io"] = direct_io;
  j["io_note"] = io_note;
  j["verify_checksums"] = verify_checksums;
  j["mlock"] = mlock;
  j["throttle_bw"] = throttle_bw;
  j["throttle_latency_us"] = throttle_latency_us;
  j["kernel"] = kernel;
  j["store_id"] = store_id;
  j["bundle_dir"] = bundle_dir;
  j["live"] = attached.load();
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

namespace {
std::mutex& registry_mu() {
  static std::mutex mu;
  return mu;
}
std::map<std::string, std::shared_ptr<StoreStats>>& registry() {
  static std::map<std::string, std::shared_ptr<StoreStats>> r;
  return r;
}
}  // namespace

std::shared_ptr<StoreStats> stats_attach(const std::string& id) {
  std::lock_guard<std::mutex> lk(registry_mu());
  auto& slot = registry()[id];
  if (!slot || slot->attached.load()) slot = std::make_shared<StoreStats>();
  slot->attached = true;
  return slot;
}

std::shared_ptr<StoreStats> stats_find(const std::string& id) {
  std::lock_guard<std::mutex> lk(registry_mu());
  auto it = registry().find(id);
  return it == registry().end() ? nullptr : it->second;
}

}  // namespace edgemoe
