// The expert store: composes the pieces that keep experts under a hard byte budget (docs/op-contract.md,
// "The expert store and its cache"):
//   BlobSource (blob_source.h; throttle.h decorates it)  where bytes come from
//   ReadScheduler (scheduler.h)                          which read runs next, on the I/O threads
//   ExpertArena (arena.h)                                the memory expert bytes live in (mapped <= budget)
//   EvictionPolicy (policy.h)                            which resident expert goes first
//   StoreStats (stats.h)                                 the counters
// and owns what ties them together: the cache entries, pins, protections, the budget reservation and the
// usage history every policy reads.
//
// Budget: `resident_bytes` = sum of `record.length` over every expert that is resident, being read or queued
// for a read. A read reserves its bytes BEFORE its buffer exists; a buffer goes back to the arena BEFORE its
// bytes are returned; the arena never maps more than the budget. So the expert memory of the process is
// <= budget at every instant, also during concurrent acquires.
//
// Threading: one mutex guards the entries; reads run on the scheduler's threads with it released; acquirers
// wait on a condition variable. Lock order: store -> scheduler (the scheduler never calls back under its
// lock). Pins must be released before the store is destroyed.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "edgemoe/arena.h"
#include "edgemoe/blob_source.h"
#include "edgemoe/config.h"
#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"
#include "edgemoe/scheduler.h"
#include "edgemoe/stats.h"
#include "edgemoe/throttle.h"

namespace edgemoe {

// How a prefetch is ranked (ReadScheduler) and what it may evict.
struct PrefetchHint {
  int32_t distance = 1;     // layers until the expert's layer runs (0 = the running layer)
  float confidence = 1.0f;  // predicted probability of use, in (0, 1]
};

class ExpertStore {
  struct Entry;

 public:
  // A pin on one expert: while it lives the expert cannot be evicted. It may be pending (read in flight);
  // wait() blocks until the bytes are there. Must not outlive the store.
  class Pin {
   public:
    Pin() = default;
    Pin(Pin&& o) noexcept;
    Pin& operator=(Pin&& o) noexcept;
    Pin(const Pin&) = delete;
    Pin& operator=(const Pin&) = delete;
    ~Pin() { release(); }

    // The blob (record.length bytes, page-aligned). Blocks while the read is in flight (counted as stall);
    // throws edgemoe::Error if the read or the checksum failed.
    const uint8_t* wait();
    bool ready() const;
    const ExpertRecord& record() const;
    explicit operator bool() const { return static_cast<bool>(entry_); }
    void release() noexcept;

   private:
    friend class ExpertStore;
    Pin(ExpertStore* store, std::shared_ptr<Entry> e) : store_(store), entry_(std::move(e)) {}
    ExpertStore* store_ = nullptr;
    std::shared_ptr<Entry> entry_;
  };

  // Opens the store file of `manifest`, attaches the stats under options.store_id. Throws edgemoe::Error
  // (budget below the largest expert, unreadable store, bad options).
  ExpertStore(Manifest manifest, StoreOptions options);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // A call of `layer` starts / ends (run_moe brackets every call). begin_call advances the step (a forward
  // pass starts when the layer is <= the previous call's) and sets the layer distances policies see;
  // end_call drops the prefetches of `layer` still queued (the layer ran without them: useless now).
  void begin_call(int32_t layer);
  void end_call(int32_t layer) noexcept;

  // Pins (layer, expert), reading it if needed (a demand read: before every prefetch); waits for budget if
  // the cache is full of pinned experts. The returned pin may still be pending: call wait(). A caller that
  // blocks here must not hold other pins of this store that it will only release later.
  // `variant` kTwin acquires the expert's low-bit twin (a separate entry: both copies may be resident).
  Pin acquire(int32_t layer, int32_t expert, int32_t variant = kPrimary);
  // Non-blocking acquire: like acquire() but returns std::nullopt instead of waiting for budget.
  std::optional<Pin> try_acquire(int32_t layer, int32_t expert, int32_t variant = kPrimary);
  // Queues a read of (layer, expert) and returns at once. No-op (false) if it is resident or in flight, if
  // the cache is disabled (policy none), or if room cannot be made without waiting: a prefetch evicts only
  // fully read, unpinned experts of the same layer whose protection is below its confidence (never a pinned,
  // in-flight or more likely one, never another layer's).
  bool prefetch(int32_t layer, int32_t expert, PrefetchHint hint = {}, int32_t variant = kPrimary);
  // Replaces the set of protected experts (predicted for the layers about to run) with their confidences.
  // A prefetch evicts only experts of its own layer that are less likely than itself, least likely first: an
  // expert left out of its layer's list counts `left_out`, one of a layer without any 0.5. Demand reads evict
  // in the policy's order. A protection covers both copies of an expert (keys are given as primaries).
  void protect(const std::vector<std::pair<ExpertKey, float>>& predicted, float left_out = 0.0f);
  // Blocks until every read queued or in flight at the call has completed (or was cancelled).
  void drain();
  // True if (layer, expert, variant) is resident, in flight or queued (a snapshot).
  bool is_resident(int32_t layer, int32_t expert, int32_t variant = kPrimary) const;
  // is_resident() of the primaries of experts 0..n-1 of `layer` into out[0..n), under one lock (a snapshot).
  void residency(int32_t layer, uint8_t* out, int32_t n) const;
  // The fully read experts, most recently used first (a snapshot).
  std::vector<ExpertKey> resident_keys() const;
  // What an expert of `length` bytes costs against the budget: whole memory pages.
  static uint64_t charge_of(uint64_t length);

  const Manifest& manifest() const { return manifest_; }
  const StoreOptions& options() const { return options_; }
  const std::shared_ptr<StoreStats>& stats() const { return stats_; }
  uint64_t budget_bytes() const { return budget_; }
  uint64_t resident_bytes() const;
  uint64_t arena_mapped_bytes() const { return arena_->mapped_bytes(); }
  bool cache_enabled() const { return static_cast<bool>(policy_); }
  size_t queued_reads() const { return scheduler_->queue_size(); }
  uint64_t io_busy_ns() const { return scheduler_->busy_ns(); }  // time with any read in flight

 private:
  static uint64_t charge_of(const ExpertRecord& rec) { return charge_of(rec.length); }
  std::optional<Pin> request(const ExpertKey& key, bool block);
  std::shared_ptr<Entry> new_entry(const ExpertKey& key);
  // oldest_victim (prefetch): set to the smallest last_use among the evicted, 0 left if none was evicted.
  // first (optional): an entry to evict before any other if room is needed (a primary's superseded twin; for
  // a prefetch it is a candidate whatever its layer or protection).
  bool try_reserve_locked(uint64_t bytes, const PrefetchHint* prefetch, int32_t layer = -1,
                          uint64_t* oldest_victim = nullptr, const ExpertKey* first = nullptr);
  void touch_locked(const Entry& e, bool access);  // access clock; a use if `access`
  void insert_locked(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk);
  void evict_locked(const std::shared_ptr<Entry>& e);
  bool drop_superseded_twin_locked(const ExpertKey& key);  // true if a twin left
  void release_bytes_locked(Entry& e);
  void drop_queued_locked(const std::shared_ptr<Entry>& e);
  void unpin(const std::shared_ptr<Entry>& e) noexcept;
  void wait_ready(const std::shared_ptr<Entry>& e);
  void read_entry(const std::shared_ptr<Entry>& e) noexcept;

  Manifest manifest_;
  StoreOptions options_;
  uint64_t budget_ = 0;
  std::shared_ptr<StoreStats> stats_;
  std::unique_ptr<ExpertArena> arena_;   // outlives every entry's buffer
  std::unique_ptr<BlobSource> source_;
  std::optional<FrequencyTable> frequencies_;
  std::unique_ptr<EvictionPolicy> policy_;  // null = cache disabled (policy none)

  mutable std::mutex mu_;
  std::condition_variable cv_;  // entry state changes, unpins, freed bytes
  std::unordered_map<ExpertKey, std::shared_ptr<Entry>, ExpertKeyHash> entries_;
  std::unordered_map<ExpertKey, float, ExpertKeyHash> protected_;
  std::vector<uint8_t> protected_layers_;  // per layer: 1 if protect() listed any expert of it
  float protected_left_out_ = 0.0f;        // what a left-out expert of such a layer counts
  std::vector<UsageRecord> usage_;  // per record index
  uint64_t reserved_ = 0;
  uint64_t reads_pending_ = 0;  // submitted, not yet completed or cancelled
  uint64_t clock_ = 0;
  PolicyContext ctx_;
  int32_t last_call_layer_ = -1;

  std::unique_ptr<ReadScheduler> scheduler_;  // last: its threads stop first
};

}  // namespace edgemoe
