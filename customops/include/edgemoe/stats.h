// Counters of one expert store, published in a process-wide registry keyed by store id. The registry holds
// the counters by shared_ptr, so the last values stay readable after the store is gone.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace edgemoe {

// Counters of one MoE layer, or of one thread's calls (CallStats): what acquires and prefetches of that layer
// did. Summed over layers they equal the store-wide counters of the same name.
struct LayerCounters {
  std::atomic<uint64_t> hits{0}, misses{0}, stall_ns{0}, reads{0}, bytes_read{0};
  std::atomic<uint64_t> prefetch_issued{0}, prefetch_issued_bytes{0};
  std::atomic<uint64_t> prefetch_used{0};    // prefetched experts used at least once (read done or not)
  std::atomic<uint64_t> prefetch_hidden{0};  // ... whose read had completed at first use (hidden behind compute)
  std::atomic<uint64_t> prefetch_hidden_bytes{0};
  std::atomic<uint64_t> prefetch_late{0};    // ... still being read at first use
  std::atomic<uint64_t> prefetch_wasted{0}, prefetch_wasted_bytes{0};  // evicted before any use
  std::atomic<uint64_t> prefetch_dropped{0};  // refused: no room without waiting
  std::atomic<uint64_t> prefetch_declined{0};  // predicted, not resident, but not worth a read (prefetch_cost.h)
  // Cache-aware routing (CacheAwareTopK): selections made, those not in the token's exact top-k, and the
  // reads they avoided (distinct non-resident experts of the exact choice minus of the taken one, per call).
  std::atomic<uint64_t> route_selections{0}, route_changed{0};
  std::atomic<int64_t> route_misses_avoided{0};
  // Miss precision (precision.h): (token, expert) uses computed with the primary, with the low-bit twin, or
  // skipped (exact mode: every use is high).
  std::atomic<uint64_t> uses_high{0}, uses_low{0}, uses_skipped{0};

  void reset();
  void add(const LayerCounters& other);  // every counter += other's
  // {"hits", ..., "prefetch": {"issued", "used", "hidden", "late", "wasted", "wasted_bytes", "dropped",
  //  "declined", "precision", "recall"}, "routing": {"selections", "changed", "misses_avoided"},
  //  "uses": {"high", "low", "skipped"}}
  nlohmann::ordered_json to_json() const;
};

// Counters of the calls one thread made on one store, between edgemoe_thread_stats_begin and _json (C API):
// right per call even while other threads share the store. Reads and waste are charged to the thread that
// started the read.
struct CallStats {
  explicit CallStats(size_t num_layers) : layers(num_layers) {}
  LayerCounters total;
  std::vector<LayerCounters> layers;
  std::string to_json() const;
};

struct StoreStats {
  // Counters (relaxed atomics; a snapshot is not a consistent cut across counters while running).
  std::atomic<uint64_t> hits{0};              // acquires that found the expert resident and loaded
  std::atomic<uint64_t> misses{0};            // acquires that started a read or waited for one
  std::atomic<uint64_t> reads{0};             // blob reads from storage
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> read_ns{0};           // summed over I/O threads
  std::atomic<uint64_t> stall_ns{0};          // time acquires spent waiting (for a read or for budget)
  std::atomic<uint64_t> evictions{0};
  std::atomic<uint64_t> resident_bytes{0};    // bytes allocated or reserved for resident / in-flight experts
  std::atomic<uint64_t> peak_resident_bytes{0};
  std::atomic<uint64_t> checksums_verified{0};
  std::atomic<uint64_t> prefetch_issued{0};   // prefetch() calls that started a read
  std::atomic<uint64_t> prefetch_dropped{0};  // prefetch() calls refused: no room without waiting
  std::atomic<uint64_t> prefetch_hits{0};     // hits on a prefetched expert (first use, read complete)
  std::atomic<uint64_t> prefetch_late{0};     // misses on a prefetched expert still being read
  std::atomic<uint64_t> prefetch_wasted{0};   // prefetched experts evicted before any use
  std::atomic<uint64_t> calls{0};             // OffloadedExpert computes served
  std::atomic<uint64_t> budget_waits{0};      // acquires that had to wait for an unpin to fit the budget
  std::atomic<uint64_t> throttle_ns{0};       // time I/O threads slept to emulate slower storage (in read_ns)
  std::atomic<uint64_t> prefetch_cancelled{0}; // queued prefetches dropped unread (their layer ran without them)
  std::atomic<uint64_t> prefetch_promoted{0};  // queued prefetches a demand acquire raised to demand priority
  std::atomic<uint64_t> steps{0};              // forward passes seen (a call of a layer <= the previous one)
  // Expert memory actually mapped by the arena (live + pooled buffers): <= budget_bytes at every instant.
  std::atomic<uint64_t> arena_bytes{0};
  std::atomic<uint64_t> peak_arena_bytes{0};

  // Descriptive fields (set by the store when it attaches; guarded by mu).
  mutable std::mutex mu;
  std::string store_id, bundle_dir, policy, io_mode, io_note, kernel;
  std::string routing = "exact";  // the routing rule (set by the engine)
  std::string miss_precision = "exact";   // exact | dynamic (set by the engine)
  double threshold_t1 = 0, threshold_t2 = 0;  // dynamic: the thresholds in effect
  uint64_t num_twins = 0;                 // twin records of the bundle
  bool direct_io = false;
  uint64_t budget_bytes = 0, store_bytes = 0, num_experts = 0, io_threads = 0;
  bool verify_checksums = true, mlock = false;
  double throttle_bw = 0, throttle_latency_us = 0;  // storage emulation (0 = off)

  std::atomic<bool> attached{false};  // a live store updates these counters

  // Per-layer counters (sized under mu by the store when it attaches, before any count).
  std::vector<LayerCounters> layers;
  // Adds n to field f of layer `layer` here and in `sink` (the calling thread's CallStats, may be null).
  void count(std::atomic<uint64_t> LayerCounters::*f, int32_t layer, CallStats* sink, uint64_t n = 1);
  void count(std::atomic<int64_t> LayerCounters::*f, int32_t layer, CallStats* sink, int64_t n);

  void add_resident(uint64_t delta);  // also raises the peak
  void sub_resident(uint64_t delta);
  void reset();                       // zeroes the counters; peak := current resident bytes
  std::string to_json() const;
};

// Registry. attach(): the stats object for `id` (reused if no live store is attached to it, replaced by a
// fresh one otherwise: the newest store wins), marked attached.
std::shared_ptr<StoreStats> stats_attach(const std::string& id);
std::shared_ptr<StoreStats> stats_find(const std::string& id);

// The calling thread's CallStats for store `id`: begin creates a fresh one (sized for `num_layers`), current
// returns it (null if the thread never began one for that id), end forgets it.
std::shared_ptr<CallStats> thread_stats_begin(const std::string& id, size_t num_layers);
std::shared_ptr<CallStats> thread_stats_current(const std::string& id);
void thread_stats_end(const std::string& id);

}  // namespace edgemoe
