#include "attributes.h"

namespace edgemoe {

bool attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

OrtStatus* read_layer_attribute(const OrtApi& api, const OrtKernelInfo* info, const std::string& who,
                                const Manifest& m, int32_t* layer) {
  int64_t v = -1;
  if (!attr_int(api, info, "layer", &v)) return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'layer'");
  if (v < 0 || v >= static_cast<int64_t>(m.layers.size()))
    return make_status(ORT_INVALID_ARGUMENT, m.manifest_path.string() + ": " + who +
                                                 ": attribute layer: expected an index into the manifest's layers [0, " +
                                                 std::to_string(m.layers.size()) + "), found " + std::to_string(v));
  *layer = static_cast<int32_t>(v);
  return nullptr;
}

bool attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, out);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

bool attr_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  std::string s(size, '\0');
  st = api.KernelInfoGetAttribute_string(info, name, s.data(), &size);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  s.resize(size > 0 ? size - 1 : 0);  // size includes the NUL
  *out = std::move(s);
  return true;
}

OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info, NodeAttributes* n) {
  try {
    n->node = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
  }
  const std::string who = std::string(kOpName) + " node '" + n->node + "'";
  if (!attr_int(api, info, "layer", &n->layer)) return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'layer'");
  if (!attr_int(api, info, "num_experts", &n->num_experts))
    return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'num_experts'");
  if (!attr_int(api, info, "top_k", &n->top_k)) return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'top_k'");
  attr_string(api, info, "manifest", &n->manifest);
  n->has_activation = attr_string(api, info, "activation", &n->activation);
  n->has_gated = attr_int(api, info, "gated", &n->gated);
  attr_float(api, info, "alpha", &n->alpha);
  attr_float(api, info, "limit", &n->limit);
  return nullptr;
}

OrtStatus* check_attributes(const NodeAttributes& n, const Manifest& m, MoeAttrs* a, int64_t* hidden) {
  const std::string who = std::string(kOpName) + " node '" + n.node + "'";
  const std::string mf = m.manifest_path.string();
  auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
    return make_status(ORT_INVALID_ARGUMENT, error_message(mf, -1, -1, who + ": attribute " + field, "", expected, found));
  };
  a->node_name = n.node;
  a->num_experts = n.num_experts;
  a->top_k = n.top_k;
  a->alpha = n.alpha;
  a->limit = n.limit;
  if (n.layer < 0 || n.layer >= static_cast<int64_t>(m.layers.size()))
    return bad("layer", "an index into the manifest's layers [0, " + std::to_string(m.layers.size()) + ")",
               std::to_string(n.layer));
  a->layer = static_cast<int32_t>(n.layer);
  const LayerInfo& lay = m.layers[static_cast<size_t>(n.layer)];
  if (a->num_experts != lay.num_experts)
    return bad("num_experts", std::to_string(lay.num_experts) + " (manifest layer " + std::to_string(n.layer) + ")",
               std::to_string(a->num_experts));
  if (a->top_k < 1 || a->top_k > lay.num_experts)
    return bad("top_k", "in [1, " + std::to_string(lay.num_experts) + "]", std::to_string(a->top_k));
  a->activation = lay.activation;
  if (n.has_activation) {
    Activation parsed;
    try {
      parsed = parse_activation(n.activation);
    } catch (const Error&) {
      return bad("activation", "one of silu, gelu, gelu_tanh, relu, swiglu_oai", "'" + n.activation + "'");
    }
    if (parsed != lay.activation)
      return bad("activation", std::string("'") + activation_name(lay.activation) + "' (manifest)", "'" + n.activation + "'");
  }
  a->gated = lay.gated;
  if (n.has_gated && (n.gated != 0) != lay.gated)
    return bad("gated", std::string(lay.gated ? "1" : "0") + " (manifest)", std::to_string(n.gated));
  *hidden = lay.hidden;
  return nullptr;
}

}  // namespace edgemoe
