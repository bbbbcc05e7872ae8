// Whether a predicted read pays (docs/op-contract.md, "Prediction and prefetch", "Cost rule").
//
// A prefetch of an expert that its layer then uses hides min(1, lead / r) of its read time r, lead being the
// compute left until that layer runs; a wrong one occupies the device for r, which delays the demand reads
// in proportion to how busy the device is (u, its busy fraction). With p the calibrated probability that the
// expert is used, the read pays iff
//     gain = p * min(1, lead / r) - (1 - p) * u > 0.
// Its room: if the guess is right the layer would read the expert anyway, evicting as much; only a wrong guess
// costs the victim v, a read if v is needed later (k_v = its chance of that). So it may evict v only if
// gain > (1 - p) * k_v, i.e. k_v < gain / (1 - p); k_v counts this pass's prediction p_v and reuse by a later
// token (rho, measured): k_v = 1 - (1 - p_v) * (1 - rho). On a device that reads while the model computes
// (fast storage, slow compute) most predictions pay; where storage is the bottleneck and a layer computes
// for a fraction of a read, only near-certain ones do.
//
// PrefetchCostModel learns its inputs online, per prefetcher: r from the store's reads (time per byte), u
// and the compute per layer from the intervals between consecutive layer calls of a pass (wall time minus
// the time the call waited), and the calibration of the predictors' probabilities: per distance and per
// tenth of q, how often a predicted expert was then used (single-token calls only: a batch's q is another
// quantity), starting from q itself as the prior. Predictions of the ResidualPrefetch node (`residual`) have
// a calibration of their own: they are made later, on another signal, and come true more often.
#pragma once
#include <array>
#include <cstdint>
#include <mutex>
#include <vector>

namespace edgemoe {

struct PrefetchGain {
  bool read = false;          // gain > 0: the expected saving exceeds the expected cost
  float victim_below = 0.0f;  // evict only an expert whose k_v is below this: min(1, gain / (1 - p))
};

// The rule above for one candidate: calibrated probability `p`, `save` = min(1, lead / r), device busy
// fraction `busy` in [0, 1].
PrefetchGain prefetch_gain(double p, double save, double busy);

class PrefetchCostModel {
 public:
  static constexpr int kBins = 10;         // calibration: tenths of q
  static constexpr double kPriorWeight = 4;  // pseudo-observations of the prior (p = q) per bin

  explicit PrefetchCostModel(int32_t max_distance);

  // One interval between two consecutive layer calls of a pass on one thread: its wall time, the time the
  // thread's calls waited in it (stall), and the time the device was busy in it (any read in flight).
  void observe_interval(double wall_ns, double stall_ns, double busy_ns);
  // One single-token pass: the cache hits it made and the experts resident at its end (rho = hits / resident,
  // the chance that a resident expert is used by the next token).
  void observe_pass(double hits, double resident);
  // A prediction made `distance` layers ahead with probability `q` for a single-token call, and whether the
  // expert was then used; `residual`: made by the ResidualPrefetch node (its own calibration, any distance).
  void observe_prediction(float q, int32_t distance, bool used, bool residual = false);

  // The calibrated probability of use of a prediction `q` made `distance` layers ahead (single-token calls;
  // pass batch = true for a batch, whose q is returned as is); `residual` as in observe_prediction.
  float calibrated(float q, int32_t distance, bool batch, bool residual = false) const;
  // The decision for a read of `bytes` at `ns_per_byte` (the store's mean; 0 = unknown: the read is assumed
  // to be hidden whole) of an expert whose layer runs after `lead_layers` layers of compute, with calibrated
  // probability `p`. Before any interval was observed the lead is unknown and taken to hide the read whole.
  PrefetchGain evaluate(float p, double lead_layers, uint64_t bytes, double ns_per_byte) const;

  double compute_per_layer_ns() const;  // 0 until observed
  double busy_fraction() const;         // 0 until observed
  double reuse() const;                 // rho; 0 until observed
  // What a resident expert predicted with calibrated probability `p` this pass stands to lose if evicted.
  float keep_value(float p) const;

 private:
  struct Bin {
    double n = 0, used = 0;
  };
  mutable std::mutex mu_;
  // The calibration row of a prediction (distance - 1, or the last row for residual ones); -1: none.
  int row(int32_t distance, bool residual) const;
  std::vector<std::array<Bin, kBins>> bins_;  // [distance - 1][bin], then the residual row
  double compute_ns_ = 0, busy_ = 0, reuse_ = 0;
  bool observed_ = false, pass_observed_ = false;
};

}  // namespace edgemoe
