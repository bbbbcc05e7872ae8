#include "edgemoe/scheduler.h"

#include <algorithm>
#include <chrono>

namespace edgemoe {

namespace {
uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}
}  // namespace

ReadScheduler::Key ReadScheduler::key_of(const ReadPriority& p, uint64_t seq) {
  if (p.kind == ReadPriority::Kind::Demand) return Key{0, 0, 0.0f, seq};
  // Sooner layers first, then higher confidence (negated: the set is ascending), then arrival.
  return Key{1, std::max<int32_t>(p.distance, 0), -p.confidence, seq};
}

ReadScheduler::ReadScheduler(int threads, Execute execute) : execute_(std::move(execute)) {
  try {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { worker(); });
  } catch (...) {
    stop();
    throw;
  }
}

ReadScheduler::~ReadScheduler() { stop(); }

ReadScheduler::Slot ReadScheduler::prepare() {
  Slot s;
  s.node_.emplace(Key{0, 0, 0.0f, 0}, nullptr);
  return s;
}

void ReadScheduler::submit(Slot slot, std::shared_ptr<ReadTask> task) noexcept {
  {
    std::lock_guard<std::mutex> lk(mu_);
    const bool was_idle = idle_locked();
    auto nh = slot.node_.extract(slot.node_.begin());
    task->seq_ = next_seq_++;
    task->queued_ = true;
    nh.value().first = key_of(task->priority, task->seq_);
    nh.value().second = std::move(task);
    queue_.insert(std::move(nh));  // node insert: no allocation (seq is unique, so it always inserts)
    track_locked(was_idle);
  }
  cv_.notify_one();
}

bool ReadScheduler::promote(ReadTask& task, ReadPriority p) noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  if (!task.queued_) return false;
  const Key old = key_of(task.priority, task.seq_);
  const Key now = key_of(p, task.seq_);
  if (!(now < old)) return true;
  for (auto it = queue_.lower_bound({old, nullptr}); it != queue_.end() && it->first == old; ++it) {
    if (it->second.get() != &task) continue;
    auto nh = queue_.extract(it);
    task.priority = p;
    nh.value().first = now;
    queue_.insert(std::move(nh));
    return true;
  }
  return false;
}

std::vector<std::shared_ptr<ReadTask>> ReadScheduler::cancel_if(const std::function<bool(const ReadTask&)>& pred) {
  std::vector<std::shared_ptr<ReadTask>> out;
  std::lock_guard<std::mutex> lk(mu_);
  const bool was_idle = idle_locked();
  out.reserve(queue_.size());  // the only allocation: before anything is removed
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (pred(*it->second)) {
      out.push_back(it->second);
      it->second->queued_ = false;
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  track_locked(was_idle);
  return out;
}

bool ReadScheduler::queued(const ReadTask& task) const {
  std::lock_guard<std::mutex> lk(mu_);
  return task.queued_;
}

bool ReadScheduler::idle_locked() const { return queue_.empty() && active_ == 0; }

void ReadScheduler::track_locked(bool was_idle) {
  const bool idle = idle_locked();
  if (was_idle && !idle) busy_since_ = now_ns();
  if (!was_idle && idle) busy_ns_ += now_ns() - busy_since_;
}

uint64_t ReadScheduler::busy_ns() const {
  std::lock_guard<std::mutex> lk(mu_);
  return busy_ns_ + (idle_locked() ? 0 : now_ns() - busy_since_);
}

size_t ReadScheduler::queue_size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.size();
}

void ReadScheduler::stop() noexcept {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    const bool was_idle = idle_locked();
    for (auto& kv : queue_) kv.second->queued_ = false;
    queue_.clear();
    track_locked(was_idle);
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void ReadScheduler::worker() {
  for (;;) {
    std::shared_ptr<ReadTask> task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      auto nh = queue_.extract(queue_.begin());
      task = std::move(nh.value().second);
      task->queued_ = false;
      ++active_;  // the queue was not empty: busy already
    }
    execute_(task);
    task.reset();
    std::lock_guard<std::mutex> lk(mu_);
    --active_;
    track_locked(false);
  }
}

}  // namespace edgemoe
