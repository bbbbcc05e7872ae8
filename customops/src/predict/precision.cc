#include "edgemoe/precision.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "edgemoe/profile.h"

namespace edgemoe {

void unimportance(const float* w, int64_t K, float* s) {
  double total = 0;
  for (int64_t k = 0; k < K; ++k) total += w[k] > 0 ? static_cast<double>(w[k]) : 0.0;
  if (!(total > 0) || !std::isfinite(total)) {
    for (int64_t k = 0; k < K; ++k) s[k] = 0.0f;
    return;
  }
  // K is small (top_k): rank by counting the weights above each slot (ties: the earlier slot ranks higher).
  for (int64_t k = 0; k < K; ++k) {
    const double wk = w[k] > 0 ? w[k] : 0.0;
    double above = 0;
    for (int64_t j = 0; j < K; ++j) {
      const double wj = w[j] > 0 ? w[j] : 0.0;
      if (wj > wk || (wj == wk && j < k)) above += wj;
    }
    s[k] = static_cast<float>(std::min(1.0, above / total));
  }
}

std::pair<float, float> derive_thresholds(const RoutingProfile& profile) {
  std::vector<std::pair<double, double>> pts;  // (s, count)
  double total = 0;
  for (const LayerProfile& lp : profile.layers) {
    const size_t R = lp.gate_counts.size(), B = lp.gate_edges.size() < 2 ? 0 : lp.gate_edges.size() - 1;
    if (!R || !B) continue;
    std::vector<double> mean(R, 0.0), n(R, 0.0);
    for (size_t r = 0; r < R; ++r) {
      for (size_t b = 0; b < B && b < lp.gate_counts[r].size(); ++b) {
        const double c = static_cast<double>(lp.gate_counts[r][b]);
        mean[r] += c * 0.5 * (lp.gate_edges[b] + lp.gate_edges[b + 1]);
        n[r] += c;
      }
      if (n[r] > 0) mean[r] /= n[r];
    }
    for (size_t r = 0; r < R; ++r) {
      double below = 0;
      for (size_t j = r + 1; j < R; ++j) below += mean[j];
      for (size_t b = 0; b < B && b < lp.gate_counts[r].size(); ++b) {
        const double c = static_cast<double>(lp.gate_counts[r][b]);
        if (c <= 0) continue;
        const double w = 0.5 * (lp.gate_edges[b] + lp.gate_edges[b + 1]);
        const double s = r == 0 ? 0.0 : std::clamp(1.0 - w - below, 0.0, 1.0);
        pts.emplace_back(s, c);
        total += c;
      }
    }
  }
  if (!(total > 0)) return {kDefaultT1, kDefaultT2};
  std::sort(pts.begin(), pts.end());
  auto quantile = [&](double q) {
    double acc = 0;
    for (const auto& [s, c] : pts) {
      acc += c;
      if (acc >= q * total) return s;
    }
    return pts.back().first;
  };
  float t1 = static_cast<float>(quantile(kTargetHighShare));
  float t2 = static_cast<float>(quantile(1.0 - kTargetSkipShare));
  if (!(t2 > t1)) t2 = std::min(1.0f, t1 + 0.05f);
  if (!(t2 > t1)) t1 = t2 - 0.05f;  // t1 was 1: keep T1 < T2
  return {t1, t2};
}

}  // namespace edgemoe
