// Expert memory the engine owns. Every expert buffer is an anonymous private mapping (never malloc), so
// freed expert memory goes back to the kernel at once and RSS follows the budget instead of the allocator's
// heaps (glibc's dynamic mmap threshold moved multi-MB buffers onto heaps that fragmented and never shrank).
//
// ExpertArena hands out page-aligned buffers whose mapped bytes, live plus pooled, never exceed its capacity
// (the budget). A released buffer is kept mapped in a pool and reused by the next request of the same size
// (experts of one format have one size), so steady-state decode does no mmap/munmap and no page faults;
// pooled buffers of other sizes are unmapped first whenever a new mapping would exceed the capacity.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

namespace edgemoe {

struct ArenaOptions {
  bool mlock = false;      // mlock every mapping (edgemoe.mlock): expert memory is never swapped/compressed
  bool hugepages = false;  // madvise(MADV_HUGEPAGE) mappings of >= 2 MiB (edgemoe.hugepages)
};

// One anonymous read/write mapping (move-only; munmap on destruction).
class MappedBuffer {
 public:
  MappedBuffer() = default;
  // Maps `bytes` (rounded up to the page size). Throws std::bad_alloc if the kernel refuses the mapping,
  // edgemoe::Error if mlock was asked and fails.
  MappedBuffer(size_t bytes, const ArenaOptions& options);
  ~MappedBuffer() { reset(); }
  MappedBuffer(MappedBuffer&& o) noexcept;
  MappedBuffer& operator=(MappedBuffer&& o) noexcept;
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
  uint8_t* data() const { return ptr_; }
  size_t size() const { return size_; }  // mapped bytes (a multiple of the page size)
  explicit operator bool() const { return ptr_ != nullptr; }
  void reset() noexcept;

 private:
  uint8_t* ptr_ = nullptr;
  size_t size_ = 0;
};

class ExpertArena {
 public:
  // A buffer of the arena: returned to the arena's pool when destroyed. Must not outlive the arena.
  class Buffer {
   public:
    Buffer() = default;
    ~Buffer() { reset(); }
    Buffer(Buffer&& o) noexcept : arena_(o.arena_), mem_(std::move(o.mem_)), bytes_(o.bytes_) { o.arena_ = nullptr; }
    Buffer& operator=(Buffer&& o) noexcept;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    uint8_t* data() const { return mem_.data(); }
    uint64_t size() const { return bytes_; }
    explicit operator bool() const { return static_cast<bool>(mem_); }
    void reset() noexcept;

   private:
    friend class ExpertArena;
    Buffer(ExpertArena* a, MappedBuffer m, uint64_t bytes) : arena_(a), mem_(std::move(m)), bytes_(bytes) {}
    ExpertArena* arena_ = nullptr;
    MappedBuffer mem_;
    uint64_t bytes_ = 0;
  };

  // `mapped_out` / `peak_out` (may be null) mirror mapped_bytes() / peak_mapped_bytes() for the statistics.
  ExpertArena(uint64_t capacity, ArenaOptions options, std::atomic<uint64_t>* mapped_out = nullptr,
              std::atomic<uint64_t>* peak_out = nullptr)
      : capacity_(capacity), options_(options), mapped_out_(mapped_out), peak_out_(peak_out) {}
  ExpertArena(const ExpertArena&) = delete;
  ExpertArena& operator=(const ExpertArena&) = delete;

  // A buffer of at least `bytes` (page-aligned). Reuses a pooled buffer of the same size if there is one;
  // otherwise unmaps pooled buffers until a new mapping fits the capacity. Throws std::bad_alloc if it still
  // does not fit (the caller reserves budget first, so this means a caller bug or a kernel refusal).
  // Thread-safe.
  Buffer take(uint64_t bytes);
  // Unmaps every pooled buffer.
  void trim() noexcept;

  uint64_t capacity() const { return capacity_; }
  uint64_t mapped_bytes() const;       // live + pooled
  uint64_t peak_mapped_bytes() const;  // high-water mark of mapped_bytes()
  const ArenaOptions& options() const { return options_; }

 private:
  void give(MappedBuffer m) noexcept;
  void publish() noexcept;  // under mu_
  const uint64_t capacity_;
  const ArenaOptions options_;
  std::atomic<uint64_t>* mapped_out_;
  std::atomic<uint64_t>* peak_out_;
  mutable std::mutex mu_;
  std::multimap<size_t, MappedBuffer> pool_;  // by mapped size
  uint64_t mapped_ = 0, peak_ = 0;
};

}  // namespace edgemoe
