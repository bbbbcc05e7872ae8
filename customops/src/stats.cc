#include "edgemoe/stats.h"

#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>

namespace edgemoe {

namespace {
uint64_t ld(const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); }
double ratio(uint64_t num, uint64_t den) { return den ? static_cast<double>(num) / static_cast<double>(den) : 0.0; }
}  // namespace

namespace {
// Every unsigned counter of LayerCounters, once: reset() and add() walk it.
using Counter = std::atomic<uint64_t> LayerCounters::*;
constexpr Counter kCounters[] = {
    &LayerCounters::hits,           &LayerCounters::misses,          &LayerCounters::stall_ns,
    &LayerCounters::reads,          &LayerCounters::bytes_read,      &LayerCounters::prefetch_issued,
    &LayerCounters::prefetch_issued_bytes, &LayerCounters::prefetch_used, &LayerCounters::prefetch_hidden,
    &LayerCounters::prefetch_hidden_bytes, &LayerCounters::prefetch_late, &LayerCounters::prefetch_wasted,
    &LayerCounters::prefetch_wasted_bytes, &LayerCounters::prefetch_dropped, &LayerCounters::prefetch_declined,
    &LayerCounters::route_selections,
    &LayerCounters::route_changed,  &LayerCounters::uses_high,       &LayerCounters::uses_low,
    &LayerCounters::uses_skipped,
};
}  // namespace

void LayerCounters::reset() {
  for (Counter c : kCounters) (this->*c).store(0, std::memory_order_relaxed);
  route_misses_avoided.store(0, std::memory_order_relaxed);
}

void LayerCounters::add(const LayerCounters& o) {
  for (Counter c : kCounters) (this->*c).fetch_add(ld(o.*c), std::memory_order_relaxed);
  route_misses_avoided.fetch_add(o.route_misses_avoided.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

nlohmann::ordered_json LayerCounters::to_json() const {
  nlohmann::ordered_json j;
  j["hits"] = ld(hits);
  j["misses"] = ld(misses);
  j["stall_s"] = static_cast<double>(ld(stall_ns)) * 1e-9;
  j["reads"] = ld(reads);
  j["bytes_read"] = ld(bytes_read);
  const uint64_t used = ld(prefetch_used);
  // Experts a call needed that were not resident from the cache: read on demand, or prefetched.
  const uint64_t demand_misses = ld(misses) - std::min(ld(misses), ld(prefetch_late));
  nlohmann::ordered_json p;
  p["issued"] = ld(prefetch_issued);
  p["issued_bytes"] = ld(prefetch_issued_bytes);
  p["used"] = used;
  p["hidden"] = ld(prefetch_hidden);
  p["hidden_bytes"] = ld(prefetch_hidden_bytes);
  p["late"] = ld(prefetch_late);
  p["wasted"] = ld(prefetch_wasted);
  p["wasted_bytes"] = ld(prefetch_wasted_bytes);
  p["dropped"] = ld(prefetch_dropped);
  p["declined"] = ld(prefetch_declined);
  p["precision"] = ratio(used, ld(prefetch_issued));
  p["recall"] = ratio(used, used + demand_misses);
  j["prefetch"] = std::move(p);
  j["routing"] = {{"selections", ld(route_selections)},
                  {"changed", ld(route_changed)},
                  {"misses_avoided", route_misses_avoided.load(std::memory_order_relaxed)}};
  j["uses"] = {{"high", ld(uses_high)}, {"low", ld(uses_low)}, {"skipped", ld(uses_skipped)}};
  return j;
}

std::string CallStats::to_json() const {
  nlohmann::ordered_json j = total.to_json();
  nlohmann::ordered_json ls = nlohmann::ordered_json::array();
  for (const auto& l : layers) ls.push_back(l.to_json());
  j["layers"] = std::move(ls);
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

void StoreStats::count(std::atomic<uint64_t> LayerCounters::*f, int32_t layer, CallStats* sink, uint64_t n) {
  const size_t l = static_cast<size_t>(layer);
  if (layer >= 0 && l < layers.size()) (layers[l].*f).fetch_add(n, std::memory_order_relaxed);
  if (sink) {
    (sink->total.*f).fetch_add(n, std::memory_order_relaxed);
    if (layer >= 0 && l < sink->layers.size()) (sink->layers[l].*f).fetch_add(n, std::memory_order_relaxed);
  }
}

void StoreStats::count(std::atomic<int64_t> LayerCounters::*f, int32_t layer, CallStats* sink, int64_t n) {
  const size_t l = static_cast<size_t>(layer);
  if (layer >= 0 && l < layers.size()) (layers[l].*f).fetch_add(n, std::memory_order_relaxed);
  if (sink) {
    (sink->total.*f).fetch_add(n, std::memory_order_relaxed);
    if (layer >= 0 && l < sink->layers.size()) (sink->layers[l].*f).fetch_add(n, std::memory_order_relaxed);
  }
}

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
  {
    std::lock_guard<std::mutex> lk(mu);
    for (auto& l : layers) l.reset();
  }
  peak_resident_bytes.store(resident_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
  peak_arena_bytes.store(arena_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

std::string StoreStats::to_json() const {
  nlohmann::ordered_json j;
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
  {
    LayerCounters sum;  // the prefetch and routing summaries over every layer
    for (const auto& l : layers) sum.add(l);
    const auto summed = sum.to_json();
    j["prefetch"] = summed["prefetch"];
    j["routing"] = summed["routing"];
    j["routing"]["rule"] = routing;
    j["uses"] = summed["uses"];
    j["miss_precision"] = {{"mode", miss_precision}, {"t1", threshold_t1}, {"t2", threshold_t2}, {"twins", num_twins}};
    nlohmann::ordered_json ls = nlohmann::ordered_json::array();
    for (const auto& l : layers) ls.push_back(l.to_json());
    j["layers"] = std::move(ls);
  }
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

namespace {
std::unordered_map<std::string, std::shared_ptr<CallStats>>& thread_sinks() {
  thread_local std::unordered_map<std::string, std::shared_ptr<CallStats>> sinks;
  return sinks;
}
}  // namespace

std::shared_ptr<CallStats> thread_stats_begin(const std::string& id, size_t num_layers) {
  auto s = std::make_shared<CallStats>(num_layers);
  thread_sinks()[id] = s;
  return s;
}

std::shared_ptr<CallStats> thread_stats_current(const std::string& id) {
  auto& m = thread_sinks();
  if (m.empty()) return nullptr;
  auto it = m.find(id);
  return it == m.end() ? nullptr : it->second;
}

void thread_stats_end(const std::string& id) { thread_sinks().erase(id); }

}  // namespace edgemoe
