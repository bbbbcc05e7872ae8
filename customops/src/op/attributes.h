// Node attributes of OffloadedExpert and their checks against the manifest, apart from the computation
// (docs/op-contract.md, "Node"), and the attribute readers every op of the domain uses.
#pragma once
#include <string>

#include "edgemoe/moe.h"
#include "ort.h"

namespace edgemoe {

struct NodeAttributes {
  std::string node = "?";
  std::string manifest = "manifest.json";
  int64_t layer = 0, num_experts = 0, top_k = 0, gated = 0;
  bool has_activation = false, has_gated = false;
  std::string activation;
  float alpha = 1.702f, limit = 7.0f;
};

// One attribute of the node being created: false if it is absent (or of another type).
bool attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out);
bool attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out);
bool attr_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* out);

// The `layer` attribute of a node `who` (e.g. "CacheAwareTopK node 'x'") of the manifest `m`'s store:
// required, an index into the manifest's layers. An error status names the manifest, the node and the attribute.
OrtStatus* read_layer_attribute(const OrtApi& api, const OrtKernelInfo* info, const std::string& who,
                                const Manifest& m, int32_t* layer);

// Reads the attributes; an error status names the node and the missing attribute.
OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info, NodeAttributes* out);
// Checks them against the manifest and fills `attrs`; an error status names the manifest, the node, the
// attribute, expected vs found.
OrtStatus* check_attributes(const NodeAttributes& n, const Manifest& m, MoeAttrs* attrs, int64_t* hidden);

}  // namespace edgemoe
