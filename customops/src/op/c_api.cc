// The statistics and configuration C API (edgemoe/c_api.h). No exception crosses the C boundary.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

#include "edgemoe/c_api.h"
#include "edgemoe/config.h"
#include "edgemoe/engine.h"
#include "edgemoe/kernels.h"
#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"
#include "edgemoe/stats.h"
#include "edgemoe/warm_start.h"

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

extern "C" EDGEMOE_EXPORT int64_t edgemoe_reader_limits_json(char* buf, int64_t len) {
  try {
    std::string j = "[";
    for (const auto& l : edgemoe::reader_limits()) {
      if (j.size() > 1) j += ",";
      j += std::string("{\"name\":\"") + l.name + "\",\"value\":" + std::to_string(l.value) + ",\"doc\":\"" +
           l.doc + "\"}";
    }
    return copy_out(j + "]", buf, len);
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

extern "C" EDGEMOE_EXPORT int64_t edgemoe_thread_stats_begin(const char* store_id) {
  try {
    if (store_id == nullptr) return -1;
    auto s = edgemoe::stats_find(store_id);
    if (!s) return -1;
    size_t layers = 0;
    {
      std::lock_guard<std::mutex> lk(s->mu);
      layers = s->layers.size();
    }
    edgemoe::thread_stats_begin(store_id, layers);
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" EDGEMOE_EXPORT int64_t edgemoe_thread_stats_json(const char* store_id, char* buf, int64_t len) {
  try {
    if (store_id == nullptr) return -1;
    auto c = edgemoe::thread_stats_current(store_id);
    if (!c) return -1;
    return copy_out(c->to_json(), buf, len);
  } catch (...) {
    return -1;
  }
}

extern "C" EDGEMOE_EXPORT void edgemoe_thread_stats_end(const char* store_id) {
  try {
    if (store_id != nullptr) edgemoe::thread_stats_end(store_id);
  } catch (...) {
  }
}

extern "C" EDGEMOE_EXPORT int64_t edgemoe_save_resident(const char* store_id, const char* path, char* err,
                                                        int64_t err_len) {
  std::string msg;
  try {
    if (store_id == nullptr || path == nullptr) {
      msg = "edgemoe_save_resident: store id and path are required";
    } else if (auto e = edgemoe::find_engine(store_id)) {
      edgemoe::save_resident_set(e->store(), path);
      return 0;
    } else {
      msg = std::string("edgemoe_save_resident: no live session for store id '") + store_id + "'";
    }
  } catch (const std::exception& ex) {
    try {
      msg = ex.what();
    } catch (...) {
    }
  } catch (...) {
  }
  if (err != nullptr && err_len > 0) {
    const size_t n = std::min(msg.size(), static_cast<size_t>(err_len - 1));
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
  }
  return -1;
}
