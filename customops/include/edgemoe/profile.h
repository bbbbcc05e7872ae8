// A bundle's routing profile (profile.json, written by edgemoe-profile; docs/bundle-format.md "profile.json"):
// the tables the predictors read. The Python reader (edgemoe_ort/bundle/profile.py) checks the same rules.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "edgemoe/manifest.h"

namespace edgemoe {

// Bit set of predictors (the names of the profile's "auto" lists and of edgemoe.predictor).
enum PredictorBit : uint32_t { kPredictTable = 1u, kPredictGates = 2u, kPredictToken = 4u, kPredictResidual = 8u };
// The predictors' names, in PredictorBit order: the one list edgemoe.predictor, the profile's "auto" lists and
// their error messages draw from (edgemoe_ort.bundle.profile.PREDICTORS is the same list; tests check it).
const std::vector<std::string>& predictor_names();
// "table" / "gates" / "token" / "residual" -> its bit; 0 for an unknown name.
uint32_t predictor_bit(const std::string& name);
// `prefix` + the names joined as "a, b, c" + `last` + the final one: "none, table, ... or auto".
std::string predictor_list(const std::string& first, const std::string& last);

// A sparse distribution: (expert, probability of being among the layer's K chosen), sorted by p descending.
using SparseDist = std::vector<std::pair<int32_t, float>>;

struct LayerProfile {
  int32_t num_experts = 0, top_k = 0;
  std::vector<float> prior;  // frequency / tokens_seen per expert: the fallback distribution
  // EdgeMoE's tables keyed by the experts (sorted) the same token chose at the previous layers.
  std::unordered_map<std::string, SparseDist> order1, order2;
  std::unordered_map<int64_t, SparseDist> tokens;
  uint32_t auto_members = 0;  // PredictorBit set the held-out split measured best for this layer
  // gate_weights: per rank (top_k rows) a histogram of the normalized gate weight over bins [edges[b], edges[b+1])
  std::vector<double> gate_edges;
  std::vector<std::vector<uint64_t>> gate_counts;
};

struct RoutingProfile {
  std::string path;
  std::vector<LayerProfile> layers;  // one per manifest layer

  // Key of an expert set (the order1/order2 maps): the sorted experts, layers separated.
  static std::string key(const std::vector<int32_t>& prev1);
  static std::string key(const std::vector<int32_t>& prev2, const std::vector<int32_t>& prev1);
};

// xxh3_64 of the manifest file's bytes, 16 lowercase hex digits: the bundle identity profiles (and saved
// resident sets) are keyed by.
std::string manifest_identity(const Manifest& m);

// Loads and checks `path` against `m` (layer count, experts, top_k, identity, every table entry). Throws
// edgemoe::Error naming the file, the field (`layers[2].tokens.next[5]`), expected and found.
RoutingProfile load_profile(const std::string& path, const Manifest& m);

}  // namespace edgemoe
