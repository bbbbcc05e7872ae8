// RegisterCustomOps: reads the edgemoe.* session config entries (through the table in edgemoe/config.h) and
// adds the "edgemoe" domain with OffloadedExpert, TokenPrefetch, CacheAwareTopK and ResidualPrefetch to the
// SessionOptions. No exception crosses the C boundary.
#include <memory>
#include <mutex>
#include <vector>

#include "edgemoe/c_api.h"
#include "edgemoe/config.h"
#include "cache_aware_topk.h"
#include "kernel.h"
#include "residual_prefetch.h"
#include "token_prefetch.h"
#include "ort.h"

namespace edgemoe {
namespace {

// Domains and ops must outlive every session using them: kept for the life of the process.
struct Registration {
  explicit Registration(const std::shared_ptr<StoreGroup>& g) : op(g), token_op(g), topk_op(g), residual_op(g), domain(kDomain) {}
  OffloadedExpertOp op;
  TokenPrefetchOp token_op;
  CacheAwareTopKOp topk_op;
  ResidualPrefetchOp residual_op;
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
    RuntimeConfig cfg = read_runtime_config(
        [&](const char* key, std::string* v) { return config_entry(*api, options, key, v); });
    auto reg = std::make_unique<Registration>(std::make_shared<StoreGroup>(std::move(cfg)));
    reg->domain.Add(&reg->op);
    reg->domain.Add(&reg->token_op);
    reg->domain.Add(&reg->topk_op);
    reg->domain.Add(&reg->residual_op);
    Ort::ThrowOnError(api->AddCustomOpDomain(options, reg->domain));
    std::lock_guard<std::mutex> lk(registrations_mu());
    registrations().push_back(std::move(reg));
    return nullptr;
  } catch (const Ort::Exception& ex) {
    return api->CreateStatus(ex.GetOrtErrorCode(), valid_utf8(ex.what()).c_str());
  } catch (const std::exception& ex) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, valid_utf8(ex.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "edgemoe: unknown error in RegisterCustomOps");
  }
}

