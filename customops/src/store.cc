#include "edgemoe/store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_INLINE_ALL  // header-only xxHash: no runtime dependency on libxxhash
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>

#include "edgemoe/kernels.h"

namespace edgemoe {

namespace {
using Clock = std::chrono::steady_clock;
uint64_t ns_since(Clock::time_point t0) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
}
std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string hex16(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}
}  // namespace

// --- options ---------------------------------------------------------------------------------------------
IoMode parse_io_mode(const std::string& s) {
  if (s == "direct") return IoMode::Direct;
  if (s == "buffered") return IoMode::Buffered;
  if (s == "mmap") return IoMode::Mmap;
  throw Error("edgemoe.io_mode: expected one of direct, buffered, mmap, found '" + s + "'");
}

const char* io_mode_name(IoMode m) {
  switch (m) {
    case IoMode::Direct: return "direct";
    case IoMode::Buffered: return "buffered";
    case IoMode::Mmap: return "mmap";
  }
  return "?";
}

uint64_t parse_budget(const std::string& spec_in, uint64_t store_bytes) {
  std::string spec;
  for (char c : spec_in)
    if (!std::isspace(static_cast<unsigned char>(c))) spec += c;
  auto bad = [&](const std::string& why) {
    return Error("edgemoe.budget: expected bytes ('268435456'), a size ('256MB', '1GiB') or a percentage of the "
                 "store ('25%'), found '" + spec_in + "'" + (why.empty() ? "" : " (" + why + ")"));
  };
  if (spec.empty()) return store_bytes;
  size_t pos = 0;
  while (pos < spec.size() && (std::isdigit(static_cast<unsigned char>(spec[pos])) || spec[pos] == '.')) ++pos;
  const std::string num = spec.substr(0, pos);
  const std::string unit = lower(spec.substr(pos));
  if (num.empty() || std::count(num.begin(), num.end(), '.') > 1 || num == ".") throw bad("");
  const double x = std::strtod(num.c_str(), nullptr);
  double bytes = 0;
  if (unit == "%") {
    if (x <= 0 || x > 100) throw bad("a percentage must be in (0, 100]");
    bytes = std::floor(x / 100.0 * static_cast<double>(store_bytes));
  } else {
    static const std::pair<const char*, double> units[] = {
        {"", 1.0},           {"b", 1.0},          {"kb", 1e3},         {"mb", 1e6},         {"gb", 1e9},
        {"tb", 1e12},        {"kib", 1024.0},     {"mib", 1048576.0},  {"gib", 1073741824.0},
        {"tib", 1099511627776.0}, {"k", 1024.0},  {"m", 1048576.0},    {"g", 1073741824.0}};
    bool found = false;
    for (const auto& [name, mult] : units) {
      if (unit == name) {
        bytes = std::floor(x * mult);
        found = true;
        break;
      }
    }
    if (!found) throw bad("unknown unit '" + unit + "'");
    if (unit.empty() && num.find('.') != std::string::npos) throw bad("a byte count must be an integer");
  }
  if (!(bytes >= 1)) throw bad("the budget must be at least 1 byte");
  if (bytes >= 1.8e19) throw bad("too large");
  return static_cast<uint64_t>(bytes);
}

namespace {
double parse_nonneg(const std::string& key, const std::string& spec_in, bool units, const char* expected) {
  std::string spec;
  for (char c : spec_in)
    if (!std::isspace(static_cast<unsigned char>(c))) spec += c;
  auto bad = [&]() { return Error(key + ": expected " + expected + ", found '" + spec_in + "'"); };
  if (spec.empty()) throw bad();
  if (spec == "0") return 0;
  if (units && spec.back() != '%' && std::isalpha(static_cast<unsigned char>(spec.back()))) {
    try {
      return static_cast<double>(parse_budget(spec, 0));
    } catch (const Error&) {
      throw bad();
    }
  }
  char* end = nullptr;
  const double v = std::strtod(spec.c_str(), &end);
  if (end == spec.c_str() || *end != '\0' || !(v >= 0) || !std::isfinite(v)) throw bad();
  return v;
}

std::string num_str(double v) {
  std::ostringstream o;
  o.precision(15);
  o << v;
  return o.str();
}

constexpr const char* kBwExpected = "0 (off) or a read bandwidth in bytes per second in [1, 1e13]";
constexpr const char* kLatencyExpected = "0 (off) or a per-read latency in microseconds in (0, 1e9]";

void check_bw(double v, const std::string& found) {
  if (!(v == 0 || (v >= kMinThrottleBw && v <= kMaxThrottleBw)))
    throw Error(std::string("edgemoe.throttle_bw: out of range: expected ") + kBwExpected + ", found " + found);
}
void check_latency(double v, const std::string& found) {
  if (!(v >= 0 && v <= kMaxThrottleLatencyUs))
    throw Error(std::string("edgemoe.throttle_latency_us: out of range: expected ") + kLatencyExpected + ", found " +
                found);
}

// Nanoseconds as a duration, saturated to [0, max] (never a double -> int64 conversion out of range).
Clock::duration ns_sat(double ns) {
  if (!(ns > 0)) return Clock::duration::zero();  // also NaN
  const auto d = std::chrono::duration<double, std::nano>(ns);
  if (d >= std::chrono::duration<double, std::nano>(Clock::duration::max())) return Clock::duration::max();
  return std::chrono::duration_cast<Clock::duration>(d);
}
Clock::time_point add_sat(Clock::time_point t, Clock::duration d) {
  if (d > Clock::duration::zero() && t.time_since_epoch() > Clock::duration::zero() &&
      d > Clock::time_point::max() - t)
    return Clock::time_point::max();
  return t + d;
}
}  // namespace

void validate_throttle(double bytes_per_s, double latency_us) {
  check_bw(bytes_per_s, num_str(bytes_per_s));
  check_latency(latency_us, num_str(latency_us));
}

double parse_throttle_bw(const std::string& spec) {
  const double v = parse_nonneg("edgemoe.throttle_bw", spec, true, kBwExpected);
  check_bw(v, "'" + spec + "'");
  return v;
}

double parse_throttle_latency_us(const std::string& spec) {
  const double v = parse_nonneg("edgemoe.throttle_latency_us", spec, false, kLatencyExpected);
  check_latency(v, "'" + spec + "'");
  return v;
}

Clock::time_point Throttle::complete_at(Clock::time_point start, uint64_t bytes) {
  const Clock::duration lat = ns_sat(latency_us_ * 1e3);
  const Clock::duration xfer = bw_ > 0 ? ns_sat(static_cast<double>(bytes) / bw_ * 1e9) : Clock::duration::zero();
  std::lock_guard<std::mutex> lk(mu_);
  // The command is issued at `start`; its data moves after its latency, once the device is free (one
  // bandwidth for all readers: transfers are serialized, latencies overlap).
  const Clock::time_point xfer_start = std::max(add_sat(start, lat), device_free_);
  device_free_ = add_sat(xfer_start, xfer);
  return device_free_;
}

// --- AlignedBuffer ---------------------------------------------------------------------------------------
AlignedBuffer::AlignedBuffer(size_t bytes, size_t alignment) : size_(bytes) {
  void* p = nullptr;
  if (bytes == 0) bytes = alignment;
  if (posix_memalign(&p, alignment, bytes) != 0 || p == nullptr) throw std::bad_alloc();
  ptr_.reset(static_cast<uint8_t*>(p));
}

void AlignedBuffer::Free::operator()(uint8_t* p) const noexcept { std::free(p); }

// --- BlobReader ------------------------------------------------------------------------------------------
void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

BlobReader::BlobReader(const std::string& path, uint64_t file_size, IoMode mode)
    : path_(path), file_size_(file_size), mode_(mode) {
  auto open_error = [&](const char* how) {
    const int err = errno;
    return Error(error_message(path_, -1, -1, "store.file", std::string("cannot open the store (") + how + ")",
                               "a readable file", err == ENOENT ? "nothing" : std::strerror(err)));
  };
  if (mode_ == IoMode::Direct) {
    fd_.reset(::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
    if (!fd_) {
      if (errno != EINVAL) throw open_error("O_DIRECT");
      note_ = "O_DIRECT not supported for " + path_ + " (open: " + std::strerror(EINVAL) +
              "); using buffered reads + POSIX_FADV_DONTNEED";
    } else if (file_size_ >= 4096) {
      // Some filesystems accept O_DIRECT at open and refuse it at read time: probe one aligned block.
      AlignedBuffer probe(4096, 4096);
      ssize_t r;
      int err = 0;
      do {
        r = ::pread(fd_.get(), probe.data(), 4096, 0);
        err = r < 0 ? errno : 0;
      } while (r < 0 && err == EINTR);
      if (r < 0 && err == EINVAL) {
        fd_.reset();
        note_ = "O_DIRECT not supported for " + path_ + " (read: " + std::strerror(EINVAL) +
                "); using buffered reads + POSIX_FADV_DONTNEED";
      } else if (r < 0) {
        throw Error(error_message(path_, -1, -1, "store.file", "cannot read the store (O_DIRECT probe of the first block)",
                                  "a readable file", std::strerror(err)));
      } else {
        direct_ = true;
      }
    } else {
      direct_ = true;
    }
    if (!direct_) mode_ = IoMode::Buffered;
  }
  if (!fd_) {
    fd_.reset(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd_) throw open_error(mode_ == IoMode::Mmap ? "mmap" : "buffered");
  }
  if (mode_ == IoMode::Mmap && file_size_ > 0) {
    void* p = ::mmap(nullptr, file_size_, PROT_READ, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      throw Error(error_message(path_, -1, -1, "store.file", "cannot mmap the store", "a mappable file",
                                std::strerror(err)));
    }
    map_ = static_cast<const uint8_t*>(p);
    map_len_ = file_size_;
  }
}

BlobReader::~BlobReader() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_len_);
}

void BlobReader::read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) const {
  auto fail = [&](const std::string& message, const std::string& found) {
    return Error(path_ + ": " + what + ": blob bytes: " + message + " (expected " + std::to_string(length) +
                 " bytes at offset " + std::to_string(offset) + ", found " + found + ")");
  };
  if (mode_ == IoMode::Mmap) {
    // The mapping was made at the validated size; a file truncated since then would SIGBUS on access.
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) throw fail("fstat failed", std::strerror(errno));
    if (static_cast<uint64_t>(st.st_size) < offset + length || offset + length > map_len_)
      throw fail("truncated store", "a file of " + std::to_string(st.st_size) + " bytes");
    std::memcpy(dst, map_ + offset, length);
    // Do not let the mapping / page cache become a second, unbudgeted cache.
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t a = offset / page * page;
    ::madvise(const_cast<uint8_t*>(map_) + a, offset + length - a, MADV_DONTNEED);
    ::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
    return;
  }
  uint64_t done = 0;
  while (done < length) {
    const ssize_t r = ::pread(fd_.get(), dst + done, length - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw fail(std::string("read failed: ") + std::strerror(errno), std::to_string(done) + " bytes");
    }
    if (r == 0) throw fail("truncated store (unexpected end of file)", std::to_string(done) + " bytes");
    done += static_cast<uint64_t>(r);
  }
  if (mode_ == IoMode::Buffered)
    ::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
}

// --- ExpertStore -----------------------------------------------------------------------------------------
struct ExpertStore::Entry {
  enum class State : uint8_t { Loading, Ready, Failed };
  ExpertKey key;
  const ExpertRecord* rec = nullptr;
  size_t index = 0;
  State state = State::Loading;
  AlignedBuffer buf;
  int pins = 0;
  bool used = false;         // pinned at least once since it was read
  bool by_prefetch = false;  // read started by prefetch()
  bool cached = false;       // in entries_
  bool accounted = false;    // holds rec->length bytes of reserved_
  std::string error;
};

ExpertStore::ExpertStore(Manifest manifest, StoreOptions options)
    : manifest_(std::move(manifest)), options_(std::move(options)) {
  const std::string mfile = manifest_.manifest_path.string();
  budget_ = options_.budget_bytes == 0 ? manifest_.store_size : options_.budget_bytes;
  // The largest expert (the budget must hold at least one of each).
  const ExpertRecord* largest = nullptr;
  for (const auto& l : manifest_.experts)
    for (const auto& r : l)
      if (!largest || r.length > largest->length) largest = &r;
  if (largest && budget_ < largest->length) {
    throw Error(error_message(mfile, largest->layer, largest->expert, "edgemoe.budget",
                              "budget below the largest expert",
                              ">= " + std::to_string(largest->length) + " bytes (its length)",
                              std::to_string(budget_) + " bytes"));
  }
  if (options_.io_threads < 1 || options_.io_threads > 256)
    throw Error("edgemoe.io_threads: expected an integer in [1, 256], found " + std::to_string(options_.io_threads));
  policy_ = make_policy(options_.policy);
  reader_ = std::make_unique<BlobReader>(manifest_.store_path.string(), manifest_.store_size, options_.io_mode);
  validate_throttle(options_.throttle_bw, options_.throttle_latency_us);
  if (options_.throttle_bw > 0 || options_.throttle_latency_us > 0)
    throttle_ = std::make_unique<Throttle>(options_.throttle_bw, options_.throttle_latency_us);
  verified_.assign(manifest_.num_records(), 0);
  if (options_.store_id.empty()) options_.store_id = manifest_.bundle_dir.string();

  stats_ = stats_attach(options_.store_id);
  {
    std::lock_guard<std::mutex> lk(stats_->mu);
    stats_->store_id = options_.store_id;
    stats_->bundle_dir = manifest_.bundle_dir.string();
    stats_->policy = options_.policy;
    stats_->io_mode = io_mode_name(options_.io_mode);
    stats_->io_note = reader_->note();
    stats_->direct_io = reader_->direct_io();
    stats_->kernel = kernel_path();
    stats_->budget_bytes = budget_;
    stats_->store_bytes = manifest_.store_size;
    stats_->num_experts = manifest_.num_records();
    stats_->io_threads = static_cast<uint64_t>(options_.io_threads);
    stats_->verify_checksums = options_.verify_checksums;
    stats_->throttle_bw = options_.throttle_bw;
    stats_->throttle_latency_us = options_.throttle_latency_us;
  }
  stats_->resident_bytes = 0;
  try {
    for (int i = 0; i < options_.io_threads; ++i) workers_.emplace_back([this] { io_worker(); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lk(q_mu_);
      stopping_ = true;
    }
    q_cv_.notify_all();
    stop_cv_.notify_all();
    for (auto& t : workers_) t.join();
    stats_->attached = false;
    throw;
  }
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    stopping_ = true;
    queue_.clear();  // pending reads nobody waits for (pins never outlive the store)
  }
  q_cv_.notify_all();
  stop_cv_.notify_all();  // a throttled read in progress stops sleeping
  for (auto& t : workers_) t.join();
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : entries_) kv.second->buf = AlignedBuffer();
  entries_.clear();
  stats_->sub_resident(reserved_);
  reserved_ = 0;
  stats_->attached = false;
}

uint64_t ExpertStore::resident_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return reserved_;
}

bool ExpertStore::is_resident(int32_t layer, int32_t expert) const {
  std::lock_guard<std::mutex> lk(mu_);
  return entries_.count(ExpertKey{layer, expert}) != 0;
}

ExpertStore::ReadJob ExpertStore::new_job() {
  ReadJob job;
  job.push_back(std::make_shared<Entry>());
  return job;
}

// Publishes a new entry in entries_ and the policy. Strong guarantee: if anything throws, neither holds it.
void ExpertStore::insert_locked(const std::shared_ptr<Entry>& e, bool access) {
  entries_.emplace(e->key, e);  // on exception: nothing inserted
  try {
    policy_->on_insert(e->key, e->rec->length);
    if (access) policy_->on_access(e->key);
  } catch (...) {
    entries_.erase(e->key);
    policy_->on_remove(e->key);
    throw;
  }
  e->cached = true;
}

bool ExpertStore::try_reserve_locked(uint64_t bytes) {
  if (bytes > budget_) return false;
  if (reserved_ + bytes > budget_) {
    if (!policy_) return false;
    std::vector<ExpertKey> cands;
    for (const auto& kv : entries_) {
      if (kv.second->pins == 0 && kv.second->state == Entry::State::Ready) cands.push_back(kv.first);
    }
    const uint64_t need = reserved_ + bytes - budget_;
    uint64_t freed = 0;
    std::vector<std::shared_ptr<Entry>> victims;
    while (freed < need) {
      if (cands.empty()) return false;
      const std::optional<ExpertKey> v = policy_->victim(cands, current_layer_);
      if (!v) return false;
      auto pos = std::find(cands.begin(), cands.end(), *v);
      if (pos == cands.end())
        throw Error(std::string("eviction policy '") + policy_->name() + "' returned a non-candidate: layer " +
                    std::to_string(v->layer) + " expert " + std::to_string(v->expert));
      cands.erase(pos);
      const auto& e = entries_.at(*v);
      freed += e->rec->length;
      victims.push_back(e);
    }
    for (const auto& e : victims) evict_locked(e);
  }
  reserved_ += bytes;
  stats_->add_resident(bytes);
  return true;
}

void ExpertStore::release_bytes_locked(Entry& e) {
  e.buf = AlignedBuffer();  // free first: allocated bytes never exceed reserved_
  if (e.accounted) {
    e.accounted = false;
    reserved_ -= e.rec->length;
    stats_->sub_resident(e.rec->length);
  }
}

void ExpertStore::evict_locked(const std::shared_ptr<Entry>& e) {
  entries_.erase(e->key);
  e->cached = false;
  policy_->on_remove(e->key);
  stats_->evictions.fetch_add(1, std::memory_order_relaxed);
  if (e->by_prefetch && !e->used) stats_->prefetch_wasted.fetch_add(1, std::memory_order_relaxed);
  release_bytes_locked(*e);
}

std::optional<ExpertStore::Pin> ExpertStore::request(int32_t layer, int32_t expert, bool block) {
  const ExpertRecord& rec = manifest_.record(layer, expert);  // throws for an unknown expert
  const size_t index = manifest_.record_index(layer, expert);
  const ExpertKey key{layer, expert};
  const auto t0 = Clock::now();
  bool waited = false;
  auto account_wait = [&] {
    if (waited) stats_->stall_ns.fetch_add(ns_since(t0), std::memory_order_relaxed);
  };
  ReadJob job;  // allocated before any bytes are reserved
  {
    std::unique_lock<std::mutex> lk(mu_);
    current_layer_ = layer;
    for (;;) {
      if (policy_) {
        auto it = entries_.find(key);
        if (it != entries_.end()) {
          std::shared_ptr<Entry> e = it->second;  // Loading or Ready (failed entries are removed)
          policy_->on_access(key);  // before the pin: if it throws, nothing changed
          ++e->pins;
          const bool first_prefetched_use = e->by_prefetch && !e->used;
          if (e->state == Entry::State::Ready) {
            stats_->hits.fetch_add(1, std::memory_order_relaxed);
            if (first_prefetched_use) stats_->prefetch_hits.fetch_add(1, std::memory_order_relaxed);
          } else {
            stats_->misses.fetch_add(1, std::memory_order_relaxed);
            if (first_prefetched_use) stats_->prefetch_late.fetch_add(1, std::memory_order_relaxed);
          }
          e->used = true;
          lk.unlock();
          account_wait();
          return Pin(this, std::move(e));
        }
      }
      if (job.empty()) job = new_job();
      if (try_reserve_locked(rec.length)) {
        Entry& e = *job.front();
        e.key = key;
        e.rec = &rec;
        e.index = index;
        e.pins = 1;
        e.used = true;
        e.accounted = true;
        if (policy_) {
          try {
            insert_locked(job.front(), true);
          } catch (...) {
            release_bytes_locked(e);  // roll back the reservation (it may also have evicted: wake waiters)
            lk.unlock();
            cv_.notify_all();
            throw;
          }
        }
        stats_->misses.fetch_add(1, std::memory_order_relaxed);
        break;
      }
      if (!block) return std::nullopt;
      if (!waited) stats_->budget_waits.fetch_add(1, std::memory_order_relaxed);
      waited = true;
      cv_.wait(lk);
    }
  }
  account_wait();
  Pin pin(this, job.front());
  enqueue_read(std::move(job));
  return pin;
}

ExpertStore::Pin ExpertStore::acquire(int32_t layer, int32_t expert) {
  std::optional<Pin> p = request(layer, expert, true);
  return std::move(*p);
}

std::optional<ExpertStore::Pin> ExpertStore::try_acquire(int32_t layer, int32_t expert) {
  return request(layer, expert, false);
}

bool ExpertStore::prefetch(int32_t layer, int32_t expert) {
  const ExpertRecord& rec = manifest_.record(layer, expert);
  const size_t index = manifest_.record_index(layer, expert);
  const ExpertKey key{layer, expert};
  ReadJob job;
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (!policy_ || entries_.count(key)) return false;
    job = new_job();  // allocated before any bytes are reserved
    if (!try_reserve_locked(rec.length)) {
      stats_->prefetch_dropped.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    Entry& e = *job.front();
    e.key = key;
    e.rec = &rec;
    e.index = index;
    e.by_prefetch = true;
    e.accounted = true;
    try {
      insert_locked(job.front(), false);
    } catch (...) {
      release_bytes_locked(e);
      lk.unlock();
      cv_.notify_all();
      throw;
    }
    stats_->prefetch_issued.fetch_add(1, std::memory_order_relaxed);
  }
  enqueue_read(std::move(job));
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
    stats_->stall_ns.fetch_add(ns_since(t0), std::memory_order_relaxed);
  }
  if (e->state == Entry::State::Failed) {
    if (e->error.empty())  // the reader had no message (or no memory to build one)
      throw Error(manifest_.store_path.string() + ": layer " + std::to_string(e->rec->layer) + " expert " +
                  std::to_string(e->rec->expert) + ": read failed (no error message; out of memory?)");
    throw Error(e->error);
  }
}

void ExpertStore::enqueue_read(ReadJob job) noexcept {
  {
    std::lock_guard<std::mutex> lk(q_mu_);
    queue_.splice(queue_.end(), job);  // no allocation: cannot throw
  }
  q_cv_.notify_one();
}

// Sleeps until `until` or until the store is stopping (then returns false), so a long emulated read never
// delays the destructor.
bool ExpertStore::throttle_wait(Clock::time_point until) {
  std::unique_lock<std::mutex> lk(q_mu_);
  return !stop_cv_.wait_until(lk, until, [&] { return stopping_; });
}

void ExpertStore::io_worker() {
  for (;;) {
    std::shared_ptr<Entry> e;
    {
      std::unique_lock<std::mutex> lk(q_mu_);
      q_cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      e = std::move(queue_.front());
      queue_.pop_front();
    }
    read_entry(e);
  }
}

void ExpertStore::read_entry(const std::shared_ptr<Entry>& e) noexcept {
  const ExpertRecord& rec = *e->rec;
  bool ok = false;
  std::string err;  // may stay empty on failure (no message, or no memory for it): wait_ready reports one
  AlignedBuffer buf;
  try {
    const std::string what = "layer " + std::to_string(rec.layer) + " expert " + std::to_string(rec.expert);
    buf = AlignedBuffer(rec.length, 4096);
    const auto t0 = Clock::now();
    reader_->read(rec.offset, rec.length, buf.data(), what);
    if (throttle_) {
      // Emulated slower storage: the read completes at max(real end, emulated end).
      const auto until = throttle_->complete_at(t0, rec.length);
      const auto now = Clock::now();
      if (until > now) {
        const bool completed = throttle_wait(until);
        stats_->throttle_ns.fetch_add(ns_since(now), std::memory_order_relaxed);
        if (!completed) throw Error(manifest_.store_path.string() + ": " + what + ": read abandoned (store closing)");
      }
    }
    stats_->read_ns.fetch_add(ns_since(t0), std::memory_order_relaxed);
    stats_->reads.fetch_add(1, std::memory_order_relaxed);
    stats_->bytes_read.fetch_add(rec.length, std::memory_order_relaxed);
    if (options_.verify_checksums) {
      bool need;
      {
        std::lock_guard<std::mutex> lk(mu_);
        need = !verified_[e->index];
      }
      if (need) {
        const uint64_t h = XXH3_64bits(buf.data(), rec.size);
        if (h != rec.checksum) {
          throw Error(error_message(reader_ ? manifest_.store_path.string() : "", rec.layer, rec.expert,
                                    "xxh3_64 checksum of blob[0:" + std::to_string(rec.size) + "] at offset " +
                                        std::to_string(rec.offset),
                                    "checksum mismatch (the store is corrupt)", rec.checksum_hex, hex16(h)));
        }
        std::lock_guard<std::mutex> lk(mu_);
        verified_[e->index] = 1;
        stats_->checksums_verified.fetch_add(1, std::memory_order_relaxed);
      }
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
    if (ok) {
      e->buf = std::move(buf);
      e->state = Entry::State::Ready;
      if (!e->cached && e->pins == 0) release_bytes_locked(*e);  // uncached and abandoned while in flight
    } else {
      buf = AlignedBuffer();
      e->state = Entry::State::Failed;
      e->error = std::move(err);
      if (e->cached) {
        auto it = entries_.find(e->key);
        if (it != entries_.end() && it->second == e) entries_.erase(it);
        e->cached = false;
        policy_->on_remove(e->key);
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
