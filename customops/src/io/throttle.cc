#include "edgemoe/throttle.h"

#include <algorithm>
#include <string>

#include "edgemoe/manifest.h"

namespace edgemoe {

namespace {
using Clock = std::chrono::steady_clock;

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

ThrottledSource::ThrottledSource(std::unique_ptr<BlobSource> inner, double bytes_per_s, double latency_us,
                                 std::atomic<uint64_t>* slept_ns)
    : inner_(std::move(inner)), throttle_(bytes_per_s, latency_us), slept_ns_(slept_ns) {
  validate_throttle(bytes_per_s, latency_us);
}

void ThrottledSource::read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) {
  const auto t0 = Clock::now();
  inner_->read(offset, length, dst, what);
  const auto until = throttle_.complete_at(t0, length);
  const auto now = Clock::now();
  if (until <= now) return;
  bool interrupted;
  {
    std::unique_lock<std::mutex> lk(mu_);
    interrupted = cv_.wait_until(lk, until, [&] { return interrupted_; });
  }
  if (slept_ns_)
    slept_ns_->fetch_add(static_cast<uint64_t>(
                             std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - now).count()),
                         std::memory_order_relaxed);
  if (interrupted) throw Error(what + ": read abandoned (store closing)");
}

void ThrottledSource::interrupt() noexcept {
  {
    std::lock_guard<std::mutex> lk(mu_);
    interrupted_ = true;
  }
  cv_.notify_all();
  inner_->interrupt();
}

}  // namespace edgemoe
