#include "edgemoe/store.h"

#define XXH_INLINE_ALL  // header-only xxHash: no runtime dependency on libxxhash
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <unistd.h>

#include <cstdio>
#include <new>

#include "edgemoe/kernels.h"

namespace edgemoe {

namespace {
using Clock = std::chrono::steady_clock;
constexpr float kUnpredictedResident = 0.5f;
uint64_t ns_since(Clock::time_point t0) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
}
std::string hex16(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}
}  // namespace

// A cache entry: one expert resident, being read or queued for a read. It is the scheduler's task.
struct ExpertStore::Entry final : ReadTask {
  enum class State : uint8_t { Loading, Ready, Failed };
  ExpertKey key;
  const ExpertRecord* rec = nullptr;
  size_t index = 0;
  State state = State::Loading;
  ExpertArena::Buffer buf;
  int pins = 0;
  bool used = false;         // pinned at least once since it was read
  bool by_prefetch = false;  // read started by prefetch()
  bool cached = false;       // in entries_
  bool accounted = false;    // holds charge bytes of reserved_
  bool cancelled = false;    // a queued prefetch dropped unread
  std::shared_ptr<CallStats> sink;  // counters of the thread that started the read (may be null)
  uint64_t charge = 0;       // bytes the entry counts against the budget: its length rounded to whole pages
  std::string error;
};

ExpertStore::ExpertStore(Manifest manifest, StoreOptions options)
    : manifest_(std::move(manifest)), options_(std::move(options)) {
  const std::string mfile = manifest_.manifest_path.string();
  budget_ = options_.budget_bytes == 0 ? manifest_.store_size : options_.budget_bytes;
  const ExpertRecord* largest = nullptr;  // of either variant: a twin need not be smaller than its primary
  for (const auto& l : manifest_.experts)
    for (const auto& r : l)
      if (!largest || r.length > largest->length) largest = &r;
  for (const auto& l : manifest_.twins)
    for (const auto& r : l)
      if (r && (!largest || r->length > largest->length)) largest = &*r;
  if (largest && budget_ < charge_of(*largest)) {
    throw Error(error_message(mfile, largest->layer, largest->expert, "edgemoe.budget",
                              "budget below the largest expert",
                              ">= " + std::to_string(charge_of(*largest)) + " bytes (its length" +
                                  (charge_of(*largest) != largest->length ? ", in whole memory pages" : "") + ")",
                              std::to_string(budget_) + " bytes"));
  }
  if (options_.io_threads < 1 || options_.io_threads > 256)
    throw Error("edgemoe.io_threads: expected an integer in [1, 256], found " + std::to_string(options_.io_threads));
  validate_throttle(options_.throttle_bw, options_.throttle_latency_us);
  const PolicyInfo& pinfo = find_policy(options_.policy);
  if (!options_.frequencies.empty()) frequencies_ = load_frequencies(options_.frequencies, manifest_);
  PolicyParams params;
  params.manifest = &manifest_;
  params.budget = budget_;
  params.frequencies = frequencies_ ? &*frequencies_ : nullptr;
  params.weights = options_.policy_weights;
  params.pin_experts = options_.pin_experts;
  if (pinfo.make) policy_ = pinfo.make(params);
  if (options_.store_id.empty()) options_.store_id = manifest_.bundle_dir.string();

  stats_ = stats_attach(options_.store_id);
  try {
    arena_ = std::make_unique<ExpertArena>(budget_, options_.arena, &stats_->arena_bytes, &stats_->peak_arena_bytes);
    source_ = open_blob_source(manifest_.store_path.string(), manifest_.store_size, options_.io_mode);
    const IoMode in_effect = source_->mode();
    if (options_.throttle_bw > 0 || options_.throttle_latency_us > 0)
      source_ = std::make_unique<ThrottledSource>(std::move(source_), options_.throttle_bw,
                                                  options_.throttle_latency_us, &stats_->throttle_ns);
    usage_.assign(manifest_.num_records(), UsageRecord{});
    ctx_.num_layers = std::max<int32_t>(1, static_cast<int32_t>(manifest_.layers.size()));
    {
      std::lock_guard<std::mutex> lk(stats_->mu);
      stats_->store_id = options_.store_id;
      stats_->bundle_dir = manifest_.bundle_dir.string();
      stats_->policy = options_.policy;
      stats_->io_mode = io_mode_name(options_.io_mode);
      stats_->io_note = source_->note();
      stats_->direct_io = in_effect == IoMode::Direct;
      stats_->kernel = kernel_path();
      stats_->budget_bytes = budget_;
      stats_->store_bytes = manifest_.store_size;
      stats_->num_experts = manifest_.num_experts();
      stats_->io_threads = static_cast<uint64_t>(options_.io_threads);
      stats_->verify_checksums = options_.verify_checksums;
      stats_->throttle_bw = options_.throttle_bw;
      stats_->throttle_latency_us = options_.throttle_latency_us;
      stats_->mlock = options_.arena.mlock;
      if (stats_->layers.size() != manifest_.layers.size())  // a reattached id keeps its per-layer counters
        stats_->layers = std::vector<LayerCounters>(manifest_.layers.size());
    }
    stats_->resident_bytes = 0;
    scheduler_ = std::make_unique<ReadScheduler>(options_.io_threads, [this](const std::shared_ptr<ReadTask>& t) {
      read_entry(std::static_pointer_cast<Entry>(t));
    });
  } catch (...) {
    stats_->attached = false;
    throw;
  }
}

ExpertStore::~ExpertStore() {
  source_->interrupt();  // a throttled read in progress stops sleeping (that read is abandoned)
  scheduler_->stop();    // queued reads nobody waits for (pins never outlive the store) are dropped
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : entries_) kv.second->buf.reset();
  entries_.clear();
  stats_->sub_resident(reserved_);
  reserved_ = 0;
  stats_->attached = false;
}

// What an expert costs in memory: its buffer is a mapping of whole pages (4 KiB on x86; 16 or 64 KiB on some
// arm64 kernels, where a 4096-aligned length is rounded up).
uint64_t ExpertStore::charge_of(uint64_t length) {
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return (length + page - 1) / page * page;
}

std::vector<ExpertKey> ExpertStore::resident_keys() const {
  std::vector<std::pair<uint64_t, ExpertKey>> v;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& kv : entries_)
      if (kv.second->state == Entry::State::Ready) v.emplace_back(usage_[kv.second->index].last_use, kv.first);
  }
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<ExpertKey> out;
  out.reserve(v.size());
  for (const auto& x : v) out.push_back(x.second);
  return out;
}

uint64_t ExpertStore::resident_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return reserved_;
}

bool ExpertStore::is_resident(int32_t layer, int32_t expert, int32_t variant) const {
  std::lock_guard<std::mutex> lk(mu_);
  return entries_.count(ExpertKey{layer, expert, variant}) != 0;
}

void ExpertStore::residency(int32_t layer, uint8_t* out, int32_t n) const {
  std::lock_guard<std::mutex> lk(mu_);
  for (int32_t e = 0; e < n; ++e) out[e] = entries_.count(ExpertKey{layer, e}) != 0 ? 1 : 0;
}

void ExpertStore::begin_call(int32_t layer) {
  std::lock_guard<std::mutex> lk(mu_);
  if (last_call_layer_ < 0 || layer <= last_call_layer_) {
    ++ctx_.step;
    stats_->steps.fetch_add(1, std::memory_order_relaxed);
  }
  last_call_layer_ = layer;
  ctx_.current_layer = layer;
}

void ExpertStore::end_call(int32_t layer) noexcept {
  std::vector<std::shared_ptr<ReadTask>> dropped;
  try {
    std::lock_guard<std::mutex> lk(mu_);
    if (!policy_) return;
    dropped = scheduler_->cancel_if([layer](const ReadTask& t) {
      const auto& e = static_cast<const Entry&>(t);
      return t.priority.kind == ReadPriority::Kind::Prefetch && e.key.layer == layer && e.pins == 0;
    });
    for (const auto& t : dropped) drop_queued_locked(std::static_pointer_cast<Entry>(t));
  } catch (...) {  // no memory for the list (cancel_if allocates before removing anything): nothing dropped
  }
  if (!dropped.empty()) cv_.notify_all();
}

void ExpertStore::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return reads_pending_ == 0; });
}

void ExpertStore::protect(const std::vector<std::pair<ExpertKey, float>>& predicted, float left_out) {
  std::unordered_map<ExpertKey, float, ExpertKeyHash> next;
  std::vector<uint8_t> layers(manifest_.layers.size(), 0);
  for (const auto& kv : predicted) {
    float& c = next[kv.first];
    c = std::max(c, kv.second);
    if (kv.first.layer >= 0 && static_cast<size_t>(kv.first.layer) < layers.size())
      layers[static_cast<size_t>(kv.first.layer)] = 1;
  }
  std::lock_guard<std::mutex> lk(mu_);
  protected_.swap(next);
  protected_layers_.swap(layers);
  protected_left_out_ = std::isfinite(left_out) ? std::clamp(left_out, 0.0f, 1.0f) : 0.0f;
}

// A queued prefetch that will never run: out of the cache, its bytes returned.
void ExpertStore::drop_queued_locked(const std::shared_ptr<Entry>& e) {
  if (e->cached) {
    auto it = entries_.find(e->key);
    if (it != entries_.end() && it->second == e) entries_.erase(it);
    e->cached = false;
  }
  e->state = Entry::State::Failed;
  e->cancelled = true;  // (no message: nothing here may allocate)
  release_bytes_locked(*e);
  --reads_pending_;
  stats_->prefetch_cancelled.fetch_add(1, std::memory_order_relaxed);
}

std::shared_ptr<ExpertStore::Entry> ExpertStore::new_entry(const ExpertKey& key) {
  auto e = std::make_shared<Entry>();
  e->key = key;
  e->rec = &manifest_.record(key.layer, key.expert, key.variant);
  e->charge = charge_of(*e->rec);
  e->index = manifest_.record_index(key.layer, key.expert, key.variant);
  return e;
}

void ExpertStore::touch_locked(const Entry& e, bool access) {
  UsageRecord& u = usage_[e.index];
  u.last_use = ++clock_;
  if (access) {
    ++u.uses;
    if (e.key.variant == kPrimary) ++u.hp_uses;
    u.last_step = ctx_.step;
  }
}

// Reserves `bytes`, evicting if needed. All or nothing: the victims are chosen first (lowest keep-score
// first, by the policy) and evicted only if together they make enough room. A prefetch evicts only entries of
// its own `layer` predicted less likely than its confidence, least likely first.
bool ExpertStore::try_reserve_locked(uint64_t bytes, const PrefetchHint* prefetch, int32_t layer,
                                     uint64_t* oldest_victim, const ExpertKey* first) {
  if (bytes > budget_) return false;
  if (reserved_ + bytes > budget_) {
    if (!policy_) return false;
    const uint64_t need = reserved_ + bytes - budget_;
    std::vector<Candidate> cands;
    std::vector<std::shared_ptr<Entry>> owners;
    cands.reserve(entries_.size());
    const int32_t L = ctx_.num_layers;
    std::vector<float> protection;  // per candidate (prefetch only): its predicted probability of use
    protection.reserve(entries_.size());
    for (const auto& kv : entries_) {
      const Entry& e = *kv.second;
      if (e.pins != 0 || e.state != Entry::State::Ready) continue;
      const bool is_first = first && kv.first == *first;  // goes first, whatever the rules below say
      // Probability of use soon: the prediction where there is one; protected_left_out_ for an expert its
      // layer's prediction left out (below any listed probability; the prefetcher passes the chance that a
      // resident is used by a later token); kUnpredictedResident in a layer nobody predicted (a resident
      // expert is as likely as not to be reused: the default model reuses 51% of the previous token's).
      float prot = kUnpredictedResident;
      if (prefetch && !protected_.empty()) {
        auto p = protected_.find(kv.first.primary());
        if (p != protected_.end()) prot = p->second;
        else if (protected_layers_[static_cast<size_t>(kv.first.layer)]) prot = protected_left_out_;
      }
      // A prefetch only swaps within its own layer: it evicts an expert of that layer predicted less likely
      // than itself. Taking room from another layer would shift what every later layer keeps, and under
      // recency policies the access order of a forward pass turns one such eviction into a chain of misses.
      if (prefetch && !is_first && (kv.first.layer != layer || !(prot < prefetch->confidence))) continue;
      if (prefetch) protection.push_back(is_first ? -1.0f : prot);
      Candidate c;
      c.key = kv.first;
      c.bytes = e.charge;
      c.distance = ((kv.first.layer - ctx_.current_layer - 1) % L + L) % L + 1;
      c.from_prefetch = e.by_prefetch;
      c.used = e.used;
      c.usage = usage_[e.index];
      cands.push_back(c);
    }
    auto by_policy = [&](const Candidate& a, const Candidate& b) { return policy_->evict_before(a, b, ctx_); };
    if (!prefetch) {
      std::sort(cands.begin(), cands.end(), by_policy);
      if (first) {  // the superseded twin leads (the prefetch path does it by its protection of -1)
        auto it = std::find_if(cands.begin(), cands.end(), [&](const Candidate& c) { return c.key == *first; });
        if (it != cands.end()) std::rotate(cands.begin(), it, it + 1);
      }
    } else {  // the least likely first, then the policy's order
      std::vector<size_t> order(cands.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        if (protection[a] != protection[b]) return protection[a] < protection[b];
        return by_policy(cands[a], cands[b]);
      });
      std::vector<Candidate> sorted;
      sorted.reserve(cands.size());
      for (size_t i : order) sorted.push_back(cands[i]);
      cands.swap(sorted);
    }
    uint64_t freed = 0;
    size_t n = 0;
    while (freed < need && n < cands.size()) freed += cands[n++].bytes;
    if (freed < need) return false;
    owners.reserve(n);
    for (size_t i = 0; i < n; ++i) owners.push_back(entries_.at(cands[i].key));
    if (oldest_victim) {
      *oldest_victim = UINT64_MAX;
      for (const auto& e : owners) *oldest_victim = std::min(*oldest_victim, usage_[e->index].last_use);
    }
    for (const auto& e : owners) evict_locked(e);
  }
  reserved_ += bytes;
  stats_->add_resident(bytes);
  return true;
}

// Publishes a freshly reserved entry in the cache. If that fails (out of memory), the reservation is rolled
// back and waiters are woken (the reservation may have evicted), then the exception propagates.
void ExpertStore::insert_locked(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk) {
  try {
    entries_.emplace(e->key, e);
  } catch (...) {
    release_bytes_locked(*e);
    lk.unlock();
    cv_.notify_all();
    throw;
  }
  e->cached = true;
  touch_locked(*e, false);
}

void ExpertStore::release_bytes_locked(Entry& e) {
  e.buf.reset();  // back to the arena first: mapped expert memory never exceeds the reservations
  if (e.accounted) {
    e.accounted = false;
    reserved_ -= e.charge;
    stats_->sub_resident(e.charge);
  }
}

// A primary being read makes its twin useless (a resident primary is always the one used): once the primary's
// bytes are reserved (the twin was the first victim if room was needed), the twin leaves too, unless it is
// pinned or still being read. Called only after a successful reservation: a refused read evicts nothing.
bool ExpertStore::drop_superseded_twin_locked(const ExpertKey& key) {
  if (key.variant != kPrimary || !policy_ || !manifest_.has_twins()) return false;
  auto it = entries_.find(ExpertKey{key.layer, key.expert, kTwin});
  if (it == entries_.end() || it->second->pins != 0 || it->second->state != Entry::State::Ready) return false;
  const std::shared_ptr<Entry> twin = it->second;
  evict_locked(twin);
  return true;
}

void ExpertStore::evict_locked(const std::shared_ptr<Entry>& e) {
  entries_.erase(e->key);
  e->cached = false;
  stats_->evictions.fetch_add(1, std::memory_order_relaxed);
  if (e->by_prefetch && !e->used) {
    stats_->prefetch_wasted.fetch_add(1, std::memory_order_relaxed);
    stats_->count(&LayerCounters::prefetch_wasted, e->key.layer, e->sink.get());
    stats_->count(&LayerCounters::prefetch_wasted_bytes, e->key.layer, e->sink.get(), e->rec->length);
  }
  release_bytes_locked(*e);
}

std::optional<ExpertStore::Pin> ExpertStore::request(const ExpertKey& key, bool block) {
  const int32_t layer = key.layer;
  const auto t0 = Clock::now();
  bool waited = false;
  const std::shared_ptr<CallStats> sink = thread_stats_current(options_.store_id);
  auto account_wait = [&] {
    if (!waited) return;
    const uint64_t ns = ns_since(t0);
    stats_->stall_ns.fetch_add(ns, std::memory_order_relaxed);
    stats_->count(&LayerCounters::stall_ns, layer, sink.get(), ns);
  };
  std::shared_ptr<Entry> fresh;  // allocated before any bytes are reserved
  ReadScheduler::Slot slot;
  bool freed = false;  // a superseded twin left: waiters for budget may fit now
  {
    std::unique_lock<std::mutex> lk(mu_);
    ctx_.current_layer = layer;
    for (;;) {
      if (policy_) {
        auto it = entries_.find(key);
        if (it != entries_.end()) {
          std::shared_ptr<Entry> e = it->second;  // Loading or Ready (failed entries are removed)
          touch_locked(*e, true);
          ++e->pins;
          const bool first_prefetched_use = e->by_prefetch && !e->used;
          CallStats* issuer = e->sink.get();  // prefetch outcomes go to the thread that issued it
          if (first_prefetched_use) stats_->count(&LayerCounters::prefetch_used, layer, issuer);
          if (e->state == Entry::State::Ready) {
            stats_->hits.fetch_add(1, std::memory_order_relaxed);
            stats_->count(&LayerCounters::hits, layer, sink.get());
            if (first_prefetched_use) {
              stats_->prefetch_hits.fetch_add(1, std::memory_order_relaxed);
              stats_->count(&LayerCounters::prefetch_hidden, layer, issuer);
              stats_->count(&LayerCounters::prefetch_hidden_bytes, layer, issuer, e->rec->length);
            }
          } else {
            stats_->misses.fetch_add(1, std::memory_order_relaxed);
            stats_->count(&LayerCounters::misses, layer, sink.get());
            if (first_prefetched_use) {
              stats_->prefetch_late.fetch_add(1, std::memory_order_relaxed);
              stats_->count(&LayerCounters::prefetch_late, layer, issuer);
            }
            // Someone waits for it now: a queued prefetch becomes a demand read.
            if (e->priority.kind == ReadPriority::Kind::Prefetch &&
                scheduler_->promote(*e, ReadPriority{ReadPriority::Kind::Demand, 0, 1.0f}))
              stats_->prefetch_promoted.fetch_add(1, std::memory_order_relaxed);
          }
          e->used = true;
          lk.unlock();
          account_wait();
          return Pin(this, std::move(e));
        }
      }
      if (!fresh) {
        lk.unlock();
        fresh = new_entry(key);  // throws for an unknown expert; nothing reserved yet
        slot = ReadScheduler::prepare();
        lk.lock();
        continue;  // the cache may have changed meanwhile
      }
      const ExpertKey twin_key{key.layer, key.expert, kTwin};
      const ExpertKey* twin = key.variant == kPrimary && manifest_.has_twins() ? &twin_key : nullptr;
      if (try_reserve_locked(fresh->charge, nullptr, -1, nullptr, twin)) {
        freed = drop_superseded_twin_locked(key);
        Entry& e = *fresh;
        e.pins = 1;
        e.used = true;
        e.accounted = true;
        e.priority = ReadPriority{ReadPriority::Kind::Demand, 0, 1.0f};
        e.sink = sink;
        if (policy_) insert_locked(fresh, lk);
        touch_locked(e, true);
        stats_->misses.fetch_add(1, std::memory_order_relaxed);
        stats_->count(&LayerCounters::misses, layer, sink.get());
        ++reads_pending_;
        scheduler_->submit(std::move(slot), fresh);  // under the lock: queued before anyone can see it
        break;
      }
      if (!block) return std::nullopt;
      if (!waited) stats_->budget_waits.fetch_add(1, std::memory_order_relaxed);
      waited = true;
      cv_.wait(lk);
    }
  }
  if (freed) cv_.notify_all();
  account_wait();
  return Pin(this, std::move(fresh));
}

ExpertStore::Pin ExpertStore::acquire(int32_t layer, int32_t expert, int32_t variant) {
  std::optional<Pin> p = request(ExpertKey{layer, expert, variant}, true);
  return std::move(*p);
}

std::optional<ExpertStore::Pin> ExpertStore::try_acquire(int32_t layer, int32_t expert, int32_t variant) {
  return request(ExpertKey{layer, expert, variant}, false);
}

bool ExpertStore::prefetch(int32_t layer, int32_t expert, PrefetchHint hint, int32_t variant) {
  const ExpertKey key{layer, expert, variant};
  if (!(hint.confidence > 0.0f && hint.confidence <= 1.0f))
    throw Error("prefetch: confidence: expected a probability in (0, 1], found " + std::to_string(hint.confidence));
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!policy_ || entries_.count(key)) return false;
  }
  std::shared_ptr<Entry> fresh = new_entry(key);  // allocated before any bytes are reserved
  ReadScheduler::Slot slot = ReadScheduler::prepare();
  std::shared_ptr<CallStats> sink = thread_stats_current(options_.store_id);
  bool freed = false;  // a superseded twin left
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (entries_.count(key)) return false;
    uint64_t victim_last_use = 0;  // 0: no eviction was needed
    const ExpertKey twin_key{key.layer, key.expert, kTwin};
    const ExpertKey* twin = variant == kPrimary && manifest_.has_twins() ? &twin_key : nullptr;
    if (!try_reserve_locked(fresh->charge, &hint, layer, &victim_last_use, twin)) {
      stats_->prefetch_dropped.fetch_add(1, std::memory_order_relaxed);
      stats_->count(&LayerCounters::prefetch_dropped, layer, sink.get());
      return false;
    }
    freed = drop_superseded_twin_locked(key);
    Entry& e = *fresh;
    stats_->count(&LayerCounters::prefetch_issued, layer, sink.get());
    stats_->count(&LayerCounters::prefetch_issued_bytes, layer, sink.get(), e.rec->length);
    e.sink = std::move(sink);
    e.by_prefetch = true;
    e.accounted = true;
    e.priority = ReadPriority{ReadPriority::Kind::Prefetch, std::max<int32_t>(0, hint.distance), hint.confidence};
    insert_locked(fresh, lk);
    // A prefetch that evicted enters the cache in its victim's place in the recency order: if the guess was
    // wrong, the layer's next miss evicts it again instead of an expert of a later layer (under LRU, one
    // extra expert per forward pass otherwise shifts every layer's residents: a chain of misses).
    if (victim_last_use) usage_[e.index].last_use = victim_last_use;
    stats_->prefetch_issued.fetch_add(1, std::memory_order_relaxed);
    ++reads_pending_;
    scheduler_->submit(std::move(slot), std::move(fresh));  // under the lock: an acquire can promote it
  }
  if (freed) cv_.notify_all();
  return true;
}

void ExpertStore::unpin(const std::shared_ptr<Entry>& e) noexcept {
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Policy none: the transient buffer goes with the last pin (or, if its read is still in flight, when
    // the read completes: the bytes stay reserved until the I/O thread has dropped its buffer).
    if (--e->pins == 0 && !e->cached && e->state != Entry::State::Loading) release_bytes_locked(*e);
  }
  cv_.notify_all();
}

void ExpertStore::wait_ready(const std::shared_ptr<Entry>& e) {
  std::unique_lock<std::mutex> lk(mu_);
  if (e->state == Entry::State::Loading) {
    const auto t0 = Clock::now();
    cv_.wait(lk, [&] { return e->state != Entry::State::Loading; });
    const uint64_t ns = ns_since(t0);
    stats_->stall_ns.fetch_add(ns, std::memory_order_relaxed);
    stats_->count(&LayerCounters::stall_ns, e->key.layer, thread_stats_current(options_.store_id).get(), ns);
  }
  if (e->state == Entry::State::Failed) {
    if (e->cancelled)
      throw Error(manifest_.store_path.string() + ": layer " + std::to_string(e->rec->layer) + " expert " +
                  std::to_string(e->rec->expert) + ": prefetch cancelled");
    if (e->error.empty())  // the reader had no message (or no memory to build one)
      throw Error(manifest_.store_path.string() + ": layer " + std::to_string(e->rec->layer) + " expert " +
                  std::to_string(e->rec->expert) + ": read failed (no error message; out of memory?)");
    throw Error(e->error);
  }
}

void ExpertStore::read_entry(const std::shared_ptr<Entry>& e) noexcept {
  const ExpertRecord& rec = *e->rec;
  bool ok = false;
  std::string err;  // may stay empty on failure (no message, or no memory for it): wait_ready reports one
  ExpertArena::Buffer buf;
  try {
    // The source's messages are "<file>: <what>: blob bytes: ..." (docs/op-contract.md, "Errors"): `what` names
    // the expert only (it once held the file too, and every read error named the store twice).
    const std::string what = "layer " + std::to_string(rec.layer) + " expert " + std::to_string(rec.expert) +
                             (rec.variant == kTwin ? " (twin)" : "");
    buf = arena_->take(rec.length);
    const auto t0 = Clock::now();
    source_->read(rec.offset, rec.length, buf.data(), what);
    stats_->read_ns.fetch_add(ns_since(t0), std::memory_order_relaxed);
    stats_->reads.fetch_add(1, std::memory_order_relaxed);
    stats_->bytes_read.fetch_add(rec.length, std::memory_order_relaxed);
    stats_->count(&LayerCounters::reads, rec.layer, e->sink.get());
    stats_->count(&LayerCounters::bytes_read, rec.layer, e->sink.get(), rec.length);
    // Every read is verified (not only a blob's first): a blob that reads back differently later (a failing
    // device, a store rewritten in place) fails this acquire instead of being used and cached. The entry of
    // a failed read leaves the cache below, so a later acquire reads again. xxh3 costs ~1/10 of a page-cache
    // read and far less than a flash read (docs/reliability.md).
    if (options_.verify_checksums) {
      const uint64_t h = XXH3_64bits(buf.data(), rec.size);
      if (h != rec.checksum) {
        throw Error(error_message(manifest_.store_path.string(), rec.layer, rec.expert,
                                  "xxh3_64 checksum of blob[0:" + std::to_string(rec.size) + "] at offset " +
                                      std::to_string(rec.offset),
                                  "checksum mismatch (the store is corrupt)", rec.checksum_hex, hex16(h)));
      }
      stats_->checksums_verified.fetch_add(1, std::memory_order_relaxed);
    }
    ok = true;
  } catch (const std::bad_alloc&) {
    try {
      err = manifest_.store_path.string() + ": layer " + std::to_string(rec.layer) + " expert " +
            std::to_string(rec.expert) + ": out of memory reading " + std::to_string(rec.length) + " bytes";
    } catch (...) {  // no memory for the message either: wait_ready reports a generic one
    }
  } catch (const std::exception& ex) {
    try {
      err = ex.what();
    } catch (...) {
    }
  } catch (...) {
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    --reads_pending_;
    if (ok) {
      e->buf = std::move(buf);
      e->state = Entry::State::Ready;
      if (!e->cached && e->pins == 0) release_bytes_locked(*e);  // uncached and abandoned while in flight
    } else {
      buf.reset();
      e->state = Entry::State::Failed;
      e->error = std::move(err);
      if (e->cached) {
        auto it = entries_.find(e->key);
        if (it != entries_.end() && it->second == e) entries_.erase(it);
        e->cached = false;
      }
      release_bytes_locked(*e);
    }
  }
  cv_.notify_all();
}

// --- Pin -------------------------------------------------------------------------------------------------
ExpertStore::Pin::Pin(Pin&& o) noexcept : store_(o.store_), entry_(std::move(o.entry_)) { o.store_ = nullptr; }

ExpertStore::Pin& ExpertStore::Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    release();
    store_ = o.store_;
    entry_ = std::move(o.entry_);
    o.store_ = nullptr;
  }
  return *this;
}

const uint8_t* ExpertStore::Pin::wait() {
  if (!entry_) throw Error("edgemoe: wait() on an empty pin");
  store_->wait_ready(entry_);
  return entry_->buf.data();
}

bool ExpertStore::Pin::ready() const {
  if (!entry_) return false;
  std::lock_guard<std::mutex> lk(store_->mu_);
  return entry_->state == Entry::State::Ready;
}

const ExpertRecord& ExpertStore::Pin::record() const { return *entry_->rec; }

void ExpertStore::Pin::release() noexcept {
  if (entry_) {
    store_->unpin(entry_);
    entry_.reset();
    store_ = nullptr;
  }
}

}  // namespace edgemoe
