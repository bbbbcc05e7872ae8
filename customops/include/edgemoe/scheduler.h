// The read scheduler: a priority queue of blob reads served by a pool of I/O threads. It knows nothing of
// caches or blobs: it orders ReadTasks and hands each to the `execute` callback on an I/O thread.
//
// Order (lowest first): demand reads before prefetches; prefetches by how soon their layer runs (distance in
// layers), then by confidence (higher first); then first come, first served. A queued task can be promoted
// (a prefetch that a demand now waits for) or cancelled (a prefetch that became useless) while queued; once
// an I/O thread took it, it runs to completion.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <vector>

namespace edgemoe {

struct ReadPriority {
  enum class Kind : uint8_t { Demand = 0, Prefetch = 1 };
  Kind kind = Kind::Demand;
  int32_t distance = 0;    // prefetch: layers until the expert's layer runs (0 = the running layer)
  float confidence = 1.0f; // prefetch: predicted probability of use, in (0, 1]
};

// The unit of work. Owners derive from it (the cache's entries do); the scheduler only reads the priority.
struct ReadTask {
  virtual ~ReadTask() = default;
  ReadPriority priority;

 private:
  friend class ReadScheduler;
  uint64_t seq_ = 0;
  bool queued_ = false;
};

class ReadScheduler {
 public:
  using Execute = std::function<void(const std::shared_ptr<ReadTask>&)>;  // must not throw

  // Starts `threads` I/O threads. Throws (std::system_error) if a thread cannot be started.
  ReadScheduler(int threads, Execute execute);
  ~ReadScheduler();  // stop()
  ReadScheduler(const ReadScheduler&) = delete;
  ReadScheduler& operator=(const ReadScheduler&) = delete;

  // A prepared slot: the queue node is allocated here (may throw) so that submit() cannot fail.
  class Slot {
   public:
    Slot() = default;
    explicit operator bool() const { return !node_.empty(); }

   private:
    friend class ReadScheduler;
    std::set<std::pair<std::tuple<uint8_t, int32_t, float, uint64_t>, std::shared_ptr<ReadTask>>> node_;
  };
  static Slot prepare();  // throws std::bad_alloc
  // Queues `task` with its current priority, using the slot (no allocation; never throws).
  void submit(Slot slot, std::shared_ptr<ReadTask> task) noexcept;
  // Raises a queued task to `p` if that is sooner; false if it is not queued (running or done).
  bool promote(ReadTask& task, ReadPriority p) noexcept;
  // Removes the queued tasks for which `pred` holds (called under the scheduler's lock: keep it cheap, it must
  // not call back into the scheduler) and returns them.
  std::vector<std::shared_ptr<ReadTask>> cancel_if(const std::function<bool(const ReadTask&)>& pred);
  bool queued(const ReadTask& task) const;
  size_t queue_size() const;
  // Time (ns, steady clock) during which at least one task was queued or executing, since construction: the
  // device's busy time, for the prefetch cost rule (prefetch_cost.h).
  uint64_t busy_ns() const;
  // Drops every queued task (never executed) and joins the threads. Idempotent.
  void stop() noexcept;

 private:
  using Key = std::tuple<uint8_t, int32_t, float, uint64_t>;
  using Queue = std::set<std::pair<Key, std::shared_ptr<ReadTask>>>;
  static Key key_of(const ReadPriority& p, uint64_t seq);
  void worker();

  Execute execute_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Queue queue_;
  uint64_t next_seq_ = 0;
  bool stopping_ = false;
  bool idle_locked() const;             // nothing queued, nothing executing
  void track_locked(bool was_idle);     // after a change: opens or closes a busy period
  int active_ = 0;           // tasks executing now
  uint64_t busy_ns_ = 0;     // completed busy periods
  uint64_t busy_since_ = 0;  // start of the current busy period (!idle_locked())
  std::vector<std::thread> threads_;
};

}  // namespace edgemoe
