// The computation of one OffloadedExpert node, independent of ONNX Runtime (testable on its own).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "edgemoe/manifest.h"
#include "edgemoe/precision.h"
#include "edgemoe/store.h"

namespace edgemoe {

struct MoeAttrs {
  int32_t layer = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  Activation activation = Activation::Silu;
  bool gated = true;
  float alpha = 1.702f;
  float limit = 7.0f;
  std::string node_name;  // for error messages
};

// Runs fn(i) for i in [0, total), possibly in parallel; returns when all are done. fn never throws.
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;
ParallelFor serial_parallel_for();

// Y[t] = sum_k w[t,k] * expert_{idx[t,k]}(X[t]) for t < T. X, Y: [T, H]; idx, w: [T, K].
// Access order (what the cache sees; docs/op-contract.md "Access order"): the distinct experts used, first
// those resident at the start of the call in ascending id, then the others in ascending id. Reads are
// issued ahead (non-blocking acquires, in that order, stopping at the first that does not fit) so I/O
// overlaps compute. The result does not depend on the order: each (token, slot) output is computed into
// its own row and reduced in slot order. Throws edgemoe::Error for bad indices or store failures.
// `after_demands` (optional) runs once every expert of this call has its read queued or is pinned (the
// prefetcher: its reads then never take budget or I/O ahead of this layer's own).
// `precision` (precision.h): exact (default) computes every use with the primary; dynamic picks per expert the
// copy its most important use in the call asks for (a resident primary is always used), skips an expert whose
// every use is above T2 when neither copy is resident, and renormalizes a token's remaining weights to their
// sum before the skip (so the output keeps its scale). Counts per layer: uses high / low / skipped.
void run_moe(ExpertStore& store, const MoeAttrs& attrs, const float* X, const int64_t* idx, const float* w,
             int64_t T, int64_t H, int64_t K, float* Y, const ParallelFor& parallel_for,
             const std::function<void()>& after_demands = {}, const PrecisionOptions& precision = {});

}  // namespace edgemoe
