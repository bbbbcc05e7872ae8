// The statistics and configuration C API (edgemoe/c_api.h). No exception crosses the C boundary.
#include <cstring>
#include <string>

#include "edgemoe/c_api.h"
#include "edgemoe/config.h"
#include "edgemoe/kernels.h"
#include "edgemoe/policy.h"
#include "edgemoe/stats.h"

namespace {
int64_t copy_out(const std::string& j, char* buf, int64_t len) {
  const int64_t n = static_cast<int64_t>(j.size());
  if (buf != nullptr && len >= n + 1) std::memcpy(buf, j.c_str(), j.size() + 1);
  return n;
}
}  // namespace

extern "C" EDGEMOE_EXPORT int64_t edgemoe_store_stats_json(const char* store_id, char* buf, int64_t len) {
  try {
    if (store_id == nullptr) return -1;
    auto s = edgemoe::stats_find(store_id);
    if (!s) return -1;
    return copy_out(s->to_json(), buf, len);
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

extern "C" EDGEMOE_EXPORT int64_t edgemoe_config_keys_json(char* buf, int64_t len) {
  try {
    return copy_out(edgemoe::config_keys_json(), buf, len);
  } catch (...) {
    return -1;
  }
}

extern "C" EDGEMOE_EXPORT int64_t edgemoe_policies_json(char* buf, int64_t len) {
  try {
    std::string j = "[";
    for (const auto& p : edgemoe::policy_registry()) {
      if (j.size() > 1) j += ",";
      j += std::string("{\"name\":\"") + p.name + "\",\"doc\":\"" + p.doc + "\"}";
    }
    return copy_out(j + "]", buf, len);
  } catch (...) {
    return -1;
  }
}
