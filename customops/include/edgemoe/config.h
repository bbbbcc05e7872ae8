// Runtime configuration: the store's options and the ONE table of `edgemoe.*` session config keys (name,
// default, meaning, parser). The op reads session entries through it; Python gets it through the C API
// (edgemoe_config_keys_json) and docs/op-contract.md's table is checked against it by the tests.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "edgemoe/arena.h"
#include "edgemoe/blob_source.h"
#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"
#include "edgemoe/precision.h"
#include "edgemoe/routing.h"

namespace edgemoe {

struct StoreOptions {
  uint64_t budget_bytes = 0;   // 0 = the whole store (everything fits)
  std::string policy = "lru";  // a name of policy_registry()
  std::string frequencies;     // JSON expert frequencies ("" = none)
  HobbitWeights policy_weights;
  std::optional<int64_t> pin_experts;
  IoMode io_mode = IoMode::Direct;
  int io_threads = 2;
  bool verify_checksums = true;
  ArenaOptions arena;
  std::string store_id;  // empty = the bundle dir
  // Storage emulation (throttle.h): 0 = off.
  double throttle_bw = 0;          // bytes per second: 0 or [kMinThrottleBw, kMaxThrottleBw]
  double throttle_latency_us = 0;  // per read: [0, kMaxThrottleLatencyUs]
};

// Prediction and prefetch (prefetcher.h) and warm start (warm_start.h).
struct PrefetchOptions {
  std::string predictor = "auto";  // none | table | gates | token | auto
  std::string profile;             // routing profile path; "" = <bundle>/profile.json if it exists
  int32_t depth = 1;               // adaptive lookahead in layers, [1, 8]
  float threshold = 0.3f;          // prefetch an expert predicted with probability >= threshold, (0, 1]
  std::string warm_start;          // "" (cold) | "profile" | a resident-set file saved by edgemoe_save_resident
};

// What one registration of the library is configured with.
struct RuntimeConfig {
  std::string bundle_dir;
  std::string budget;  // "" = whole store (resolved against the store size when the store opens)
  StoreOptions store;
  PrefetchOptions prefetch;
  RoutingOptions routing;
  PrecisionOptions precision;
};

struct ConfigKey {
  const char* name;           // "edgemoe.budget"
  const char* default_value;  // as documented ("whole store", "lru", "(required)")
  const char* doc;            // one line
  void (*apply)(RuntimeConfig& cfg, const std::string& value);  // parses and stores; throws edgemoe::Error
  bool required;
};

const std::vector<ConfigKey>& config_keys();
// [{"key": ..., "default": ..., "doc": ..., "required": bool}, ...]
std::string config_keys_json();
// Applies the entries that `get(name, &value)` reports present, checks the required ones and fills defaults
// that depend on others (store_id). Throws edgemoe::Error naming the key.
template <class Get>
RuntimeConfig read_runtime_config(Get&& get) {
  RuntimeConfig c;
  std::string v;
  for (const ConfigKey& k : config_keys()) {
    if (get(k.name, &v)) {
      k.apply(c, v);
    } else if (k.required) {
      throw Error(std::string("edgemoe: session config entry '") + k.name +
                  "' is not set (set it on the SessionOptions before registering libedgemoe_customops.so)");
    }
  }
  if (c.store.store_id.empty()) c.store.store_id = c.bundle_dir;
  return c;
}

// "268435456", "256MB" (10^6), "256MiB" (2^20), "1GiB", "1.5GB", "25%" (of store_bytes), "" = whole store.
// Units: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); case-insensitive.
// Throws edgemoe::Error on a malformed value or a value < 1 byte.
uint64_t parse_budget(const std::string& spec, uint64_t store_bytes);
// "100000000", "90MB" (10^6), "1.5GiB" (per second), "0" = off. Throws edgemoe::Error (also out of range).
double parse_throttle_bw(const std::string& spec);
// Microseconds, a number in [0, kMaxThrottleLatencyUs]. Throws edgemoe::Error.
double parse_throttle_latency_us(const std::string& spec);

}  // namespace edgemoe
