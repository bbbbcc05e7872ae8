// ONNX Runtime glue: the OffloadedExpert custom op (domain "edgemoe"), RegisterCustomOps and the stats C API.
// Everything ORT-specific lives in this file; the store and the computation are in edgemoe_core.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "edgemoe/c_api.h"
#include "edgemoe/kernels.h"
#include "edgemoe/manifest.h"
#include "edgemoe/moe.h"
#include "edgemoe/stats.h"
#include "edgemoe/store.h"

namespace edgemoe {
namespace {

constexpr const char* kDomain = "edgemoe";
constexpr const char* kOpName = "OffloadedExpert";

// Session config entries read at registration (docs/op-contract.md).
struct RuntimeConfig {
  std::string bundle_dir;
  std::string budget;  // "" = whole store
  StoreOptions store;
};

OrtStatus* make_status(OrtErrorCode code, const std::string& msg) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
}

// One per registration: the store shared by every kernel created from that SessionOptions. Kernels hold it
// by shared_ptr; the group only weakly, so the store dies with the last session and is reopened by the next.
class StoreGroup {
 public:
  explicit StoreGroup(RuntimeConfig cfg) : cfg_(std::move(cfg)) {}

  std::shared_ptr<ExpertStore> get(const std::string& manifest_rel) {
    std::lock_guard<std::mutex> lk(mu_);
    const std::string norm = std::filesystem::path(manifest_rel).lexically_normal().string();
    if (auto s = store_.lock()) {
      if (norm != manifest_) {
        throw Error(cfg_.bundle_dir + ": manifest (attribute): one registration serves one manifest (expected '" +
                    manifest_ + "', found '" + manifest_rel + "'); register the library again for another");
      }
      return s;
    }
    Manifest m = load_manifest(cfg_.bundle_dir, manifest_rel);
    StoreOptions o = cfg_.store;
    o.budget_bytes = parse_budget(cfg_.budget, m.store_size);
    auto s = std::make_shared<ExpertStore>(std::move(m), o);
    store_ = s;
    manifest_ = norm;
    return s;
  }

 private:
  RuntimeConfig cfg_;
  std::mutex mu_;
  std::weak_ptr<ExpertStore> store_;
  std::string manifest_;
};

// --- attributes --------------------------------------------------------------------------------------------
bool attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
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

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// --- kernel ------------------------------------------------------------------------------------------------
struct OffloadedExpertKernel {
  std::shared_ptr<ExpertStore> store;
  MoeAttrs attrs;
  int64_t hidden = 0;

  std::string where() const {
    return store->manifest().manifest_path.string() + ": layer " + std::to_string(attrs.layer) + ": node '" +
           attrs.node_name + "'";
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() != 3 || ctx.GetOutputCount() != 1)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 3 inputs and 1 output");
      Ort::ConstValue X = ctx.GetInput(0);
      Ort::ConstValue idx = ctx.GetInput(1);
      Ort::ConstValue wts = ctx.GetInput(2);
      const std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> is = idx.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> ws = wts.GetTensorTypeAndShapeInfo().GetShape();
      auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
        return make_status(ORT_INVALID_ARGUMENT, where() + ": " + field + ": expected " + expected + ", found " + found);
      };
      if (xs.empty() || xs.back() != hidden)
        return bad("X shape", "[..., " + std::to_string(hidden) + "] (hidden of the layer)", shape_str(xs));
      if (is.size() != xs.size() || !std::equal(xs.begin(), xs.end() - 1, is.begin()))
        return bad("topk_indices shape", "the leading dims of X " + shape_str(xs) + " then K", shape_str(is));
      const int64_t K = is.back();
      if (K != attrs.top_k) return bad("topk_indices last dim (K)", "top_k = " + std::to_string(attrs.top_k), std::to_string(K));
      if (ws != is) return bad("topk_weights shape", "the shape of topk_indices " + shape_str(is), shape_str(ws));
      int64_t T = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) T *= xs[i];
      Ort::UnownedValue Y = ctx.GetOutput(0, xs);
      if (T == 0) return nullptr;
      ParallelFor pf = [&ctx](size_t total, const std::function<void(size_t)>& fn) {
        if (total <= 1) {
          for (size_t i = 0; i < total; ++i) fn(i);
          return;
        }
        ctx.ParallelFor([](void* d, size_t i) { (*static_cast<const std::function<void(size_t)>*>(d))(i); }, total,
                        0, const_cast<void*>(static_cast<const void*>(&fn)));
      };
      run_moe(*store, attrs, X.GetTensorData<float>(), idx.GetTensorData<int64_t>(), wts.GetTensorData<float>(), T,
              hidden, K, Y.GetTensorMutableData<float>(), pf);
      return nullptr;
    } catch (const Ort::Exception& ex) {
      return make_status(ex.GetOrtErrorCode(), where() + ": " + ex.what());
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, where() + ": out of memory");
    } catch (const std::exception& ex) {
      return make_status(ORT_FAIL, ex.what());
    } catch (...) {
      return make_status(ORT_FAIL, where() + ": unknown error");
    }
  }
};

struct OffloadedExpertOp : Ort::CustomOpBase<OffloadedExpertOp, OffloadedExpertKernel, true> {
  explicit OffloadedExpertOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    try {
      try {
        node = Ort::ConstKernelInfo(info).GetNodeName();
      } catch (const Ort::Exception&) {
      }
      auto kernel = std::make_unique<OffloadedExpertKernel>();
      MoeAttrs& a = kernel->attrs;
      a.node_name = node;
      const std::string who = std::string(kOpName) + " node '" + node + "'";
      int64_t layer = 0, gated = 0;
      if (!attr_int(api, info, "layer", &layer)) return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'layer'");
      if (!attr_int(api, info, "num_experts", &a.num_experts))
        return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'num_experts'");
      if (!attr_int(api, info, "top_k", &a.top_k)) return make_status(ORT_INVALID_ARGUMENT, who + ": missing int attribute 'top_k'");
      std::string manifest = "manifest.json", act;
      attr_string(api, info, "manifest", &manifest);
      const bool has_act = attr_string(api, info, "activation", &act);
      const bool has_gated = attr_int(api, info, "gated", &gated);
      attr_float(api, info, "alpha", &a.alpha);
      attr_float(api, info, "limit", &a.limit);

      kernel->store = group->get(manifest);
      const Manifest& m = kernel->store->manifest();
      const std::string mf = m.manifest_path.string();
      auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
        return make_status(ORT_INVALID_ARGUMENT,
                           error_message(mf, -1, -1, who + ": attribute " + field, "", expected, found));
      };
      if (layer < 0 || layer >= static_cast<int64_t>(m.layers.size()))
        return bad("layer", "an index into the manifest's layers [0, " + std::to_string(m.layers.size()) + ")",
                   std::to_string(layer));
      a.layer = static_cast<int32_t>(layer);
      const LayerInfo& lay = m.layers[static_cast<size_t>(layer)];
      if (a.num_experts != lay.num_experts)
        return bad("num_experts", std::to_string(lay.num_experts) + " (manifest layer " + std::to_string(layer) + ")",
                   std::to_string(a.num_experts));
      if (a.top_k < 1 || a.top_k > lay.num_experts)
        return bad("top_k", "in [1, " + std::to_string(lay.num_experts) + "]", std::to_string(a.top_k));
      a.activation = lay.activation;
      if (has_act) {
        Activation parsed;
        try {
          parsed = parse_activation(act);
        } catch (const Error&) {
          return bad("activation", "one of silu, gelu, gelu_tanh, relu, swiglu_oai", "'" + act + "'");
        }
        if (parsed != lay.activation)
          return bad("activation", std::string("'") + activation_name(lay.activation) + "' (manifest)", "'" + act + "'");
      }
      a.gated = lay.gated;
      if (has_gated && (gated != 0) != lay.gated)
        return bad("gated", std::string(lay.gated ? "1" : "0") + " (manifest)", std::to_string(gated));
      kernel->hidden = lay.hidden;
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, std::string(kOpName) + " node '" + node + "': out of memory");
    } catch (const std::exception& ex) {
      return make_status(ORT_FAIL, ex.what());
    } catch (...) {
      return make_status(ORT_FAIL, std::string(kOpName) + " node '" + node + "': unknown error");
    }
  }

  std::shared_ptr<StoreGroup> group;
};

// Domains and ops must outlive every session using them: kept for the life of the process.
struct Registration {
  explicit Registration(std::shared_ptr<StoreGroup> g) : op(std::move(g)), domain(kDomain) {}
  OffloadedExpertOp op;
  Ort::CustomOpDomain domain;
};

std::mutex& registrations_mu() {
  static std::mutex mu;
  return mu;
}
std::vector<std::unique_ptr<Registration>>& registrations() {
  static std::vector<std::unique_ptr<Registration>> r;
  return r;
}

bool config_entry(const OrtApi& api, const OrtSessionOptions* so, const char* key, std::string* out) {
  int has = 0;
  Ort::ThrowOnError(api.HasSessionConfigEntry(so, key, &has));
  if (!has) return false;
  size_t size = 0;
  Ort::ThrowOnError(api.GetSessionConfigEntry(so, key, nullptr, &size));
  std::string s(size, '\0');
  Ort::ThrowOnError(api.GetSessionConfigEntry(so, key, s.data(), &size));
  s.resize(size > 0 ? size - 1 : 0);
  *out = std::move(s);
  return true;
}

RuntimeConfig read_config(const OrtApi& api, const OrtSessionOptions* so) {
  RuntimeConfig c;
  std::string v;
  if (!config_entry(api, so, "edgemoe.bundle_dir", &c.bundle_dir) || c.bundle_dir.empty())
    throw Error("edgemoe: session config entry 'edgemoe.bundle_dir' is not set (set it on the SessionOptions before "
                "registering libedgemoe_customops.so)");
  std::error_code ec;
  if (!std::filesystem::is_directory(c.bundle_dir, ec))
    throw Error(c.bundle_dir + ": edgemoe.bundle_dir: not a bundle folder (expected a folder, found " +
                (std::filesystem::exists(c.bundle_dir, ec) ? "a file" : "nothing") + ")");
  c.bundle_dir = std::filesystem::absolute(c.bundle_dir).lexically_normal().string();
  if (config_entry(api, so, "edgemoe.budget", &c.budget)) parse_budget(c.budget, uint64_t{1} << 50);  // syntax check
  if (config_entry(api, so, "edgemoe.policy", &v)) {
    make_policy(v);  // throws for an unknown name
    c.store.policy = v;
  }
  if (config_entry(api, so, "edgemoe.io_mode", &v)) c.store.io_mode = parse_io_mode(v);
  if (config_entry(api, so, "edgemoe.io_threads", &v)) {
    size_t pos = 0;
    long n = -1;
    try {
      n = std::stol(v, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    if (pos != v.size() || n < 1 || n > 256)
      throw Error("edgemoe.io_threads: expected an integer in [1, 256], found '" + v + "'");
    c.store.io_threads = static_cast<int>(n);
  }
  if (config_entry(api, so, "edgemoe.verify_checksums", &v)) {
    if (v == "1" || v == "true" || v == "True") c.store.verify_checksums = true;
    else if (v == "0" || v == "false" || v == "False") c.store.verify_checksums = false;
    else throw Error("edgemoe.verify_checksums: expected 1 or 0, found '" + v + "'");
  }
  if (config_entry(api, so, "edgemoe.throttle_bw", &v)) c.store.throttle_bw = parse_throttle_bw(v);
  if (config_entry(api, so, "edgemoe.throttle_latency_us", &v))
    c.store.throttle_latency_us = parse_throttle_latency_us(v);
  if (!config_entry(api, so, "edgemoe.store_id", &c.store.store_id) || c.store.store_id.empty())
    c.store.store_id = c.bundle_dir;
  return c;
}

}  // namespace
}  // namespace edgemoe

extern "C" EDGEMOE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                     const OrtApiBase* api_base) {
  using namespace edgemoe;
  // No exception may cross this C boundary.
  if (api_base == nullptr) return nullptr;  // cannot even report: ORT always passes it
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    if (v1 == nullptr) return nullptr;
    try {
      const std::string msg = std::string("libedgemoe_customops.so needs ONNX Runtime API version ") +
                              std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                              std::to_string(ORT_API_VERSION) + "); this runtime is " + api_base->GetVersionString();
      return v1->CreateStatus(ORT_FAIL, msg.c_str());
    } catch (...) {
      return v1->CreateStatus(ORT_FAIL, "libedgemoe_customops.so: this ONNX Runtime is too old");
    }
  }
  Ort::InitApi(api);
  try {
    RuntimeConfig cfg = read_config(*api, options);
    auto reg = std::make_unique<Registration>(std::make_shared<StoreGroup>(std::move(cfg)));
    reg->domain.Add(&reg->op);
    Ort::ThrowOnError(api->AddCustomOpDomain(options, reg->domain));
    std::lock_guard<std::mutex> lk(registrations_mu());
    registrations().push_back(std::move(reg));
    return nullptr;
  } catch (const Ort::Exception& ex) {
    return api->CreateStatus(ex.GetOrtErrorCode(), ex.what());
  } catch (const std::exception& ex) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, ex.what());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "edgemoe: unknown error in RegisterCustomOps");
  }
}

extern "C" EDGEMOE_EXPORT int64_t edgemoe_store_stats_json(const char* store_id, char* buf, int64_t len) {
  try {
    if (store_id == nullptr) return -1;
    auto s = edgemoe::stats_find(store_id);
    if (!s) return -1;
    const std::string j = s->to_json();
    const int64_t n = static_cast<int64_t>(j.size());
    if (buf != nullptr && len >= n + 1) std::memcpy(buf, j.c_str(), j.size() + 1);
    return n;
  } catch (...) {
    return -1;
  }
}

extern "C" EDGEMOE_EXPORT void edgemoe_store_reset_stats(const char* store_id) {
  try {
    if (store_id == nullptr) return;
    if (auto s = edgemoe::stats_find(store_id)) s->reset();
  } catch (...) {  // (out of memory building the lookup key): nothing reset, nothing crosses the C boundary
  }
}

extern "C" EDGEMOE_EXPORT const char* edgemoe_kernel_path(void) {
  try {
    return edgemoe::kernel_path();
  } catch (...) {
    return "unknown";
  }
}
