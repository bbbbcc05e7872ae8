#include "edgemoe/prefetch_cost.h"

#include <algorithm>
#include <cmath>

namespace edgemoe {

namespace {
constexpr double kAlpha = 0.1;      // EWMA weight of a new interval
constexpr double kBinCap = 1000;    // a bin past this many observations halves: the calibration keeps adapting
}  // namespace

PrefetchGain prefetch_gain(double p, double save, double busy) {
  p = std::clamp(std::isfinite(p) ? p : 0.0, 0.0, 1.0);
  save = std::clamp(std::isfinite(save) ? save : 0.0, 0.0, 1.0);
  busy = std::clamp(std::isfinite(busy) ? busy : 1.0, 0.0, 1.0);
  const double gain = p * save - (1.0 - p) * busy;
  if (!(gain > 0.0)) return PrefetchGain{false, 0.0f};
  const double below = 1.0 - p > 1e-9 ? std::min(1.0, gain / (1.0 - p)) : 1.0;
  return PrefetchGain{true, static_cast<float>(below)};
}

PrefetchCostModel::PrefetchCostModel(int32_t max_distance)
    : bins_(static_cast<size_t>(std::max<int32_t>(1, max_distance)) + 1) {}

int PrefetchCostModel::row(int32_t distance, bool residual) const {
  const int last = static_cast<int>(bins_.size()) - 1;  // the residual row
  if (residual) return last;
  if (distance < 1) return -1;
  return std::min(static_cast<int>(distance), last) - 1;
}

void PrefetchCostModel::observe_interval(double wall_ns, double stall_ns, double busy_ns) {
  if (!(wall_ns > 0) || !std::isfinite(wall_ns)) return;
  const double compute = std::max(0.0, wall_ns - std::max(0.0, stall_ns));
  const double busy = std::clamp(busy_ns / wall_ns, 0.0, 1.0);
  std::lock_guard<std::mutex> lk(mu_);
  if (!observed_) {
    compute_ns_ = compute;
    busy_ = busy;
    observed_ = true;
    return;
  }
  compute_ns_ += kAlpha * (compute - compute_ns_);
  busy_ += kAlpha * (busy - busy_);
}

void PrefetchCostModel::observe_prediction(float q, int32_t distance, bool used, bool residual) {
  const int r = row(distance, residual);
  if (r < 0 || !(q >= 0.0f)) return;
  const size_t d = static_cast<size_t>(r);
  const size_t b = std::min<size_t>(kBins - 1, static_cast<size_t>(std::min(1.0f, q) * kBins));
  std::lock_guard<std::mutex> lk(mu_);
  Bin& bin = bins_[d][b];
  bin.n += 1;
  bin.used += used ? 1 : 0;
  if (bin.n > kBinCap) {
    bin.n *= 0.5;
    bin.used *= 0.5;
  }
}

float PrefetchCostModel::calibrated(float q, int32_t distance, bool batch, bool residual) const {
  const float c = std::clamp(std::isfinite(q) ? q : 0.0f, 0.0f, 1.0f);
  const int r = row(distance, residual);
  if (batch || r < 0) return c;
  const size_t d = static_cast<size_t>(r);
  const size_t b = std::min<size_t>(kBins - 1, static_cast<size_t>(c * kBins));
  std::lock_guard<std::mutex> lk(mu_);
  const Bin& bin = bins_[d][b];
  return static_cast<float>((bin.used + kPriorWeight * c) / (bin.n + kPriorWeight));
}

PrefetchGain PrefetchCostModel::evaluate(float p, double lead_layers, uint64_t bytes, double ns_per_byte) const {
  double compute, busy;
  bool observed;
  {
    std::lock_guard<std::mutex> lk(mu_);
    compute = compute_ns_;
    busy = busy_;
    observed = observed_;
  }
  const double read_ns = static_cast<double>(bytes) * ns_per_byte;
  const double lead = std::max(0.0, lead_layers) * compute;
  const double save = !observed || !(read_ns > 0) ? 1.0 : std::min(1.0, lead / read_ns);
  return prefetch_gain(p, save, busy);
}

void PrefetchCostModel::observe_pass(double hits, double resident) {
  if (!(resident > 0) || !(hits >= 0)) return;
  const double rho = std::clamp(hits / resident, 0.0, 1.0);
  std::lock_guard<std::mutex> lk(mu_);
  reuse_ = pass_observed_ ? reuse_ + kAlpha * (rho - reuse_) : rho;
  pass_observed_ = true;
}

double PrefetchCostModel::reuse() const {
  std::lock_guard<std::mutex> lk(mu_);
  return reuse_;
}

float PrefetchCostModel::keep_value(float p) const {
  const double rho = reuse();
  const double c = std::clamp(std::isfinite(p) ? static_cast<double>(p) : 0.0, 0.0, 1.0);
  return static_cast<float>(1.0 - (1.0 - c) * (1.0 - rho));
}

double PrefetchCostModel::compute_per_layer_ns() const {
  std::lock_guard<std::mutex> lk(mu_);
  return compute_ns_;
}

double PrefetchCostModel::busy_fraction() const {
  std::lock_guard<std::mutex> lk(mu_);
  return busy_;
}

}  // namespace edgemoe
