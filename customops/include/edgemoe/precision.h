// Miss precision (HOBBIT's token-level dynamic loading; docs/op-contract.md, "Miss precision"): which copy of
// an expert a call computes with when the bundle holds low-bit twins. For a token's K experts sorted by gate
// weight, the unimportance of expert i is s_i = the sum of the normalized gate weights ranked above it (0 for
// the top one). On a miss, s <= T1 reads the primary, T1 < s <= T2 the twin, s > T2 skips the expert; a
// resident copy of either precision is used as it is, except that a use with s <= T1 reads the primary.
#pragma once
#include <cstdint>
#include <utility>

namespace edgemoe {

struct RoutingProfile;

enum class MissPrecision : uint8_t { Exact, Dynamic };

// HOBBIT's Mixtral thresholds: the defaults without a profile (and for a profile without gate weights).
constexpr float kDefaultT1 = 0.6f;
constexpr float kDefaultT2 = 0.9f;
// The split the profile-derived thresholds aim at, over every (token, expert) use of the profiled text:
// HOBBIT's measured Mixtral split, 67% high / 30% low / 3% skipped.
constexpr double kTargetHighShare = 0.67;
constexpr double kTargetSkipShare = 0.03;

struct PrecisionOptions {
  MissPrecision mode = MissPrecision::Exact;  // edgemoe.miss_precision
  float t1 = kDefaultT1, t2 = kDefaultT2;     // edgemoe.thresholds: 0 <= T1 < T2 <= 1
  bool thresholds_given = false;              // else derived from the profile when the engine opens
};

enum class Precision : uint8_t { High, Low, Skip };

// s[k] for the K gate weights w[0..K) of one token (slots with idx < 0 are given weight 0 by the caller):
// ranked by weight descending, ties in slot order; weights <= 0 or a sum <= 0 (or not finite) give s = 0.
void unimportance(const float* w, int64_t K, float* s);

// The precision a use of unimportance s asks for: s <= t1 High, s <= t2 Low, else Skip.
inline Precision precision_for(float s, const PrecisionOptions& o) {
  if (!(s > o.t1)) return Precision::High;  // NaN-safe: High
  return s <= o.t2 ? Precision::Low : Precision::Skip;
}

// (T1, T2) from the profile's per-rank histograms of normalized gate weights, pooled over layers: the
// unimportance of a use at rank r is taken as 1 - w_r - (the mean weights of the ranks below r), exact for
// top-2; T1 is the kTargetHighShare quantile of the pooled s, T2 the 1 - kTargetSkipShare quantile (bin
// centres). Returns the defaults when the profile has no gate weights; T2 > T1 always.
std::pair<float, float> derive_thresholds(const RoutingProfile& profile);

}  // namespace edgemoe
