// The expert store: reads expert blobs from the bundle's store file and keeps them in a byte-budgeted
// cache shared by every OffloadedExpert node of the sessions of one registration.
//
// Budget: `resident_bytes` = sum of `record.length` over every expert that is resident or being read
// (each holds exactly one 4096-aligned buffer of `length` bytes). A read reserves its bytes BEFORE the
// buffer is allocated; a buffer is freed BEFORE its bytes are returned. So resident_bytes <= budget at all
// times, including during concurrent acquires; if the budget is full of pinned/in-flight experts an acquire
// waits for an unpin instead of exceeding it.
//
// Threading: all state is guarded by one mutex; reads run on an I/O thread pool (edgemoe.io_threads) with the
// lock released; acquirers wait on a condition variable. Pins must be released before the store is destroyed.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"
#include "edgemoe/stats.h"

namespace edgemoe {

enum class IoMode : uint8_t { Direct, Buffered, Mmap };
IoMode parse_io_mode(const std::string& s);  // throws edgemoe::Error
const char* io_mode_name(IoMode m);

// "268435456", "256MB" (10^6), "256MiB" (2^20), "1GiB", "1.5GB", "25%" (of store_bytes), "" = whole store.
// Units: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); case-insensitive.
// Throws edgemoe::Error on a malformed value or a value < 1 byte.
uint64_t parse_budget(const std::string& spec, uint64_t store_bytes);

struct StoreOptions {
  uint64_t budget_bytes = 0;  // 0 = the whole store (everything fits)
  std::string policy = "lru";  // "lru" | "none"
  IoMode io_mode = IoMode::Direct;
  int io_threads = 2;
  bool verify_checksums = true;
  std::string store_id;  // empty = the bundle dir
  // Storage emulation (edgemoe.throttle_bw / edgemoe.throttle_latency_us): a blob read takes
  // max(real time, latency + bytes / bw). Transfers of concurrent I/O threads share one bandwidth (one device);
  // latencies overlap. 0 = off. The I/O thread sleeps, so emulated reads overlap compute like real ones.
  double throttle_bw = 0;          // bytes per second: 0 or [kMinThrottleBw, kMaxThrottleBw]
  double throttle_latency_us = 0;  // per read: [0, kMaxThrottleLatencyUs]
};

// Accepted throttle ranges (0 = off for both).
constexpr double kMinThrottleBw = 1;              // bytes per second
constexpr double kMaxThrottleBw = 1e13;           // bytes per second (10 TB/s)
constexpr double kMaxThrottleLatencyUs = 1e9;     // microseconds (1000 s)

// "100000000", "90MB" (10^6), "1.5GiB" (per second), "0" = off. Throws edgemoe::Error (also out of range).
double parse_throttle_bw(const std::string& spec);
// Microseconds, a number in [0, kMaxThrottleLatencyUs]. Throws edgemoe::Error.
double parse_throttle_latency_us(const std::string& spec);
// Throws edgemoe::Error naming the key, the accepted range and the value if either is out of range.
void validate_throttle(double bytes_per_s, double latency_us);

// The emulated device: one bandwidth shared by every reader, a fixed latency per read.
class Throttle {
 public:
  Throttle(double bytes_per_s, double latency_us) : bw_(bytes_per_s), latency_us_(latency_us) {}
  bool enabled() const { return bw_ > 0 || latency_us_ > 0; }
  // The instant at which a read of `bytes` that started at `start` completes on the emulated device
  // (reserves its transfer on the shared timeline). Saturates at time_point::max() instead of overflowing.
  std::chrono::steady_clock::time_point complete_at(std::chrono::steady_clock::time_point start, uint64_t bytes);

 private:
  double bw_, latency_us_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point device_free_{};
};

// Move-only aligned heap buffer (posix_memalign / free).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(size_t bytes, size_t alignment);  // throws std::bad_alloc
  uint8_t* data() const { return ptr_.get(); }
  size_t size() const { return size_; }
  explicit operator bool() const { return static_cast<bool>(ptr_); }

 private:
  struct Free {
    void operator()(uint8_t* p) const noexcept;
  };
  std::unique_ptr<uint8_t, Free> ptr_;
  size_t size_ = 0;
};

// Owns a file descriptor: closed on destruction (also when a constructor holding it throws).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

// Reads byte ranges of the store file in the configured I/O mode.
class BlobReader {
 public:
  BlobReader(const std::string& path, uint64_t file_size, IoMode mode);
  ~BlobReader();
  BlobReader(const BlobReader&) = delete;
  BlobReader& operator=(const BlobReader&) = delete;
  // Reads [offset, offset + length) into dst (4096-aligned, `length` bytes). Throws edgemoe::Error.
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) const;
  bool direct_io() const { return direct_; }
  const std::string& note() const { return note_; }

 private:
  std::string path_;
  uint64_t file_size_ = 0;
  IoMode mode_;
  UniqueFd fd_;
  bool direct_ = false;
  std::string note_;
  const uint8_t* map_ = nullptr;
  size_t map_len_ = 0;
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

    // The blob (record.length bytes, 4096-aligned). Blocks while the read is in flight (counted as stall);
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

  // Pins (layer, expert), reading it if needed; waits for budget if the cache is full of pinned experts.
  // The returned pin may still be pending: call wait(). A caller that blocks here must not hold other pins
  // of this store that it will only release later (it could wait for itself).
  Pin acquire(int32_t layer, int32_t expert);
  // Non-blocking acquire: like acquire() but returns std::nullopt instead of waiting for budget.
  std::optional<Pin> try_acquire(int32_t layer, int32_t expert);
  // Starts reading (layer, expert) into the cache and returns at once. No-op (false) if it is resident or in
  // flight, if the cache is disabled (policy none), or if room cannot be made without waiting.
  bool prefetch(int32_t layer, int32_t expert);
  // True if (layer, expert) is resident or in flight (a snapshot).
  bool is_resident(int32_t layer, int32_t expert) const;

  const Manifest& manifest() const { return manifest_; }
  const StoreOptions& options() const { return options_; }
  const std::shared_ptr<StoreStats>& stats() const { return stats_; }
  uint64_t budget_bytes() const { return budget_; }
  uint64_t resident_bytes() const;
  bool cache_enabled() const { return static_cast<bool>(policy_); }

 private:
  std::optional<Pin> request(int32_t layer, int32_t expert, bool block);
  // A read allocated before its bytes are reserved: one Loading entry in a one-node list that enqueue_read
  // splices into queue_ without allocating (nothing that can throw happens between reserve and enqueue).
  using ReadJob = std::list<std::shared_ptr<Entry>>;
  static ReadJob new_job();
  bool try_reserve_locked(uint64_t bytes);
  void insert_locked(const std::shared_ptr<Entry>& e, bool access);
  void evict_locked(const std::shared_ptr<Entry>& e);
  void release_bytes_locked(Entry& e);
  void unpin(const std::shared_ptr<Entry>& e) noexcept;
  void wait_ready(const std::shared_ptr<Entry>& e);
  void enqueue_read(ReadJob job) noexcept;
  bool throttle_wait(std::chrono::steady_clock::time_point until);
  void read_entry(const std::shared_ptr<Entry>& e) noexcept;
  void io_worker();

  Manifest manifest_;
  StoreOptions options_;
  uint64_t budget_ = 0;
  std::unique_ptr<BlobReader> reader_;
  std::unique_ptr<Throttle> throttle_;  // null = real storage speed
  std::shared_ptr<StoreStats> stats_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // entry state changes, unpins, freed bytes
  std::unique_ptr<EvictionPolicy> policy_;  // null = cache disabled (policy none)
  std::unordered_map<ExpertKey, std::shared_ptr<Entry>, ExpertKeyHash> entries_;
  std::vector<uint8_t> verified_;  // per record_index
  uint64_t reserved_ = 0;
  int32_t current_layer_ = -1;

  std::mutex q_mu_;
  std::condition_variable q_cv_;     // queue_ non-empty or stopping_
  std::condition_variable stop_cv_;  // stopping_ (wakes throttled reads; separate so enqueue wakes an idle worker)
  ReadJob queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace edgemoe
