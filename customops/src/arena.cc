#include "edgemoe/arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <string>

#include "edgemoe/manifest.h"

namespace edgemoe {

namespace {
size_t page_size() {
  static const size_t p = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_pages(uint64_t bytes) {
  const size_t p = page_size();
  return static_cast<size_t>((bytes + p - 1) / p * p);
}
}  // namespace

MappedBuffer::MappedBuffer(size_t bytes, const ArenaOptions& options) {
  const size_t len = round_pages(bytes == 0 ? 1 : bytes);
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  ptr_ = static_cast<uint8_t*>(p);
  size_ = len;
  if (options.hugepages && len >= (size_t{2} << 20)) ::madvise(p, len, MADV_HUGEPAGE);  // a hint: may be ignored
  if (options.mlock && ::mlock(p, len) != 0) {
    const int err = errno;
    reset();
    throw Error("edgemoe.mlock: cannot lock " + std::to_string(len) + " bytes of expert memory (" +
                std::strerror(err) + "); raise RLIMIT_MEMLOCK (ulimit -l) or set edgemoe.mlock=0");
  }
}

MappedBuffer::MappedBuffer(MappedBuffer&& o) noexcept : ptr_(o.ptr_), size_(o.size_) {
  o.ptr_ = nullptr;
  o.size_ = 0;
}

MappedBuffer& MappedBuffer::operator=(MappedBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    ptr_ = o.ptr_;
    size_ = o.size_;
    o.ptr_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void MappedBuffer::reset() noexcept {
  if (ptr_) ::munmap(ptr_, size_);  // also unlocks
  ptr_ = nullptr;
  size_ = 0;
}

ExpertArena::Buffer& ExpertArena::Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    reset();
    arena_ = o.arena_;
    mem_ = std::move(o.mem_);
    bytes_ = o.bytes_;
    o.arena_ = nullptr;
  }
  return *this;
}

void ExpertArena::Buffer::reset() noexcept {
  if (arena_ && mem_) arena_->give(std::move(mem_));
  mem_.reset();
  arena_ = nullptr;
  bytes_ = 0;
}

ExpertArena::Buffer ExpertArena::take(uint64_t bytes) {
  const size_t len = round_pages(bytes == 0 ? 1 : bytes);
  std::unique_lock<std::mutex> lk(mu_);
  auto it = pool_.find(len);
  if (it != pool_.end()) {
    MappedBuffer m = std::move(it->second);
    pool_.erase(it);
    return Buffer(this, std::move(m), bytes);
  }
  // Make room: unmap pooled buffers (largest first) until the new mapping fits the capacity.
  while (mapped_ + len > capacity_ && !pool_.empty()) {
    auto last = std::prev(pool_.end());
    mapped_ -= last->second.size();
    pool_.erase(last);  // munmap
  }
  if (mapped_ + len > capacity_) {
    publish();
    throw std::bad_alloc();
  }
  mapped_ += len;  // counted before the syscall so concurrent takes cannot overshoot together
  if (mapped_ > peak_) peak_ = mapped_;
  publish();
  lk.unlock();
  try {
    MappedBuffer m(len, options_);
    return Buffer(this, std::move(m), bytes);
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    mapped_ -= len;
    publish();
    throw;
  }
}

void ExpertArena::give(MappedBuffer m) noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  try {
    const size_t n = m.size();
    pool_.emplace(n, std::move(m));  // may throw bad_alloc (map node): then it is unmapped below
  } catch (...) {
    mapped_ -= m.size();
    m.reset();
    publish();
  }
}

void ExpertArena::publish() noexcept {
  if (mapped_out_) mapped_out_->store(mapped_, std::memory_order_relaxed);
  if (peak_out_) peak_out_->store(peak_, std::memory_order_relaxed);
}

void ExpertArena::trim() noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : pool_) mapped_ -= kv.second.size();
  pool_.clear();
  publish();
}

uint64_t ExpertArena::mapped_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return mapped_;
}

uint64_t ExpertArena::peak_mapped_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return peak_;
}

}  // namespace edgemoe
