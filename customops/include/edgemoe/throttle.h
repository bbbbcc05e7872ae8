// Storage emulation (edgemoe.throttle_bw / edgemoe.throttle_latency_us; docs/op-contract.md, "Storage
// throttle"): a decorator around any BlobSource. A blob read completes at max(real end, emulated end); the
// emulated device has one bandwidth shared by every reader and a per-read latency that overlaps. The reading
// thread sleeps, so emulated reads overlap compute like real ones; interrupt() ends every sleep at once.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "edgemoe/blob_source.h"

namespace edgemoe {

// Accepted ranges (0 = off for both).
constexpr double kMinThrottleBw = 1;           // bytes per second
constexpr double kMaxThrottleBw = 1e13;        // bytes per second (10 TB/s)
constexpr double kMaxThrottleLatencyUs = 1e9;  // microseconds (1000 s)

// Throws edgemoe::Error naming the key, the accepted range and the value if either is out of range.
void validate_throttle(double bytes_per_s, double latency_us);

// The emulated device's timeline.
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

class ThrottledSource final : public BlobSource {
 public:
  // `slept_ns` (may be null) accumulates the time readers slept.
  ThrottledSource(std::unique_ptr<BlobSource> inner, double bytes_per_s, double latency_us,
                  std::atomic<uint64_t>* slept_ns);
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) override;
  IoMode mode() const override { return inner_->mode(); }
  const std::string& note() const override { return inner_->note(); }
  void interrupt() noexcept override;

 private:
  std::unique_ptr<BlobSource> inner_;
  Throttle throttle_;
  std::atomic<uint64_t>* slept_ns_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool interrupted_ = false;
};

}  // namespace edgemoe
