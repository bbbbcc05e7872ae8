#include "edgemoe/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "edgemoe/profile.h"
#include "edgemoe/throttle.h"

namespace edgemoe {

namespace {
std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
}  // namespace

uint64_t parse_budget(const std::string& spec_in, uint64_t store_bytes) {
  std::string spec;
  for (char c : spec_in)
    if (!std::isspace(static_cast<unsigned char>(c))) spec += c;
  auto bad = [&](const std::string& why) {
    return Error("edgemoe.budget: expected bytes ('268435456'), a size ('256MB', '1GiB') or a percentage of the "
                 "experts ('25%'), found '" + spec_in + "'" + (why.empty() ? "" : " (" + why + ")"));
  };
  if (spec.empty()) return store_bytes;
  size_t pos = 0;
  while (pos < spec.size() && (std::isdigit(static_cast<unsigned char>(spec[pos])) || spec[pos] == '.')) ++pos;
  const std::string num = spec.substr(0, pos);
  const std::string unit = lower(spec.substr(pos));
  if (num.empty() || std::count(num.begin(), num.end(), '.') > 1 || num == ".") throw bad("");
  const double x = std::strtod(num.c_str(), nullptr);
  double bytes = 0;
  if (unit == "%") {
    if (x <= 0 || x > 100) throw bad("a percentage must be in (0, 100]");
    bytes = std::floor(x / 100.0 * static_cast<double>(store_bytes));
  } else {
    static const std::pair<const char*, double> units[] = {
        {"", 1.0},           {"b", 1.0},          {"kb", 1e3},         {"mb", 1e6},         {"gb", 1e9},
        {"tb", 1e12},        {"kib", 1024.0},     {"mib", 1048576.0},  {"gib", 1073741824.0},
        {"tib", 1099511627776.0}, {"k", 1024.0},  {"m", 1048576.0},    {"g", 1073741824.0}};
    bool found = false;
    for (const auto& [name, mult] : units) {
      if (unit == name) {
        bytes = std::floor(x * mult);
        found = true;
        break;
      }
    }
    if (!found) throw bad("unknown unit '" + unit + "'");
    if (unit.empty() && num.find('.') != std::string::npos) throw bad("a byte count must be an integer");
  }
  if (!(bytes >= 1)) throw bad("the budget must be at least 1 byte");
  if (bytes >= 1.8e19) throw bad("too large");
  return static_cast<uint64_t>(bytes);
}

namespace {
double parse_nonneg(const std::string& key, const std::string& spec_in, bool units, const char* expected) {
  std::string spec;
  for (char c : spec_in)
    if (!std::isspace(static_cast<unsigned char>(c))) spec += c;
  auto bad = [&]() { return Error(key + ": expected " + expected + ", found '" + spec_in + "'"); };
  if (spec.empty()) throw bad();
  if (spec == "0") return 0;
  if (units && spec.back() != '%' && std::isalpha(static_cast<unsigned char>(spec.back()))) {
    try {
      return static_cast<double>(parse_budget(spec, 0));
    } catch (const Error&) {
      throw bad();
    }
  }
  char* end = nullptr;
  const double v = std::strtod(spec.c_str(), &end);
  if (end == spec.c_str() || *end != '\0' || !(v >= 0) || !std::isfinite(v)) throw bad();
  return v;
}

std::string num_str(double v) {
  std::ostringstream o;
  o.precision(15);
  o << v;
  return o.str();
}

constexpr const char* kBwExpected = "0 (off) or a read bandwidth in bytes per second in [1, 1e13]";
constexpr const char* kLatencyExpected = "0 (off) or a per-read latency in microseconds in (0, 1e9]";

void check_bw(double v, const std::string& found) {
  if (!(v == 0 || (v >= kMinThrottleBw && v <= kMaxThrottleBw)))
    throw Error(std::string("edgemoe.throttle_bw: out of range: expected ") + kBwExpected + ", found " + found);
}
void check_latency(double v, const std::string& found) {
  if (!(v >= 0 && v <= kMaxThrottleLatencyUs))
    throw Error(std::string("edgemoe.throttle_latency_us: out of range: expected ") + kLatencyExpected + ", found " +
                found);
}

}  // namespace

void validate_throttle(double bytes_per_s, double latency_us) {
  check_bw(bytes_per_s, num_str(bytes_per_s));
  check_latency(latency_us, num_str(latency_us));
}

double parse_throttle_bw(const std::string& spec) {
  const double v = parse_nonneg("edgemoe.throttle_bw", spec, true, kBwExpected);
  check_bw(v, "'" + spec + "'");
  return v;
}

double parse_throttle_latency_us(const std::string& spec) {
  const double v = parse_nonneg("edgemoe.throttle_latency_us", spec, false, kLatencyExpected);
  check_latency(v, "'" + spec + "'");
  return v;
}

namespace {
namespace fs = std::filesystem;

bool parse_bool(const std::string& key, const std::string& v) {
  if (v == "1" || v == "true" || v == "True") return true;
  if (v == "0" || v == "false" || v == "False") return false;
  throw Error(key + ": expected 1 or 0, found '" + v + "'");
}

long parse_int(const std::string& key, const std::string& v, long lo, long hi) {
  size_t pos = 0;
  long n = lo - 1;
  try {
    n = std::stol(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size() || n < lo || n > hi)
    throw Error(key + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], found '" +
                v + "'");
  return n;
}

void apply_bundle_dir(RuntimeConfig& c, const std::string& v) {
  if (v.empty())
    throw Error("edgemoe: session config entry 'edgemoe.bundle_dir' is empty (expected the bundle folder)");
  std::error_code ec;
  if (!fs::is_directory(v, ec))
    throw Error(v + ": edgemoe.bundle_dir: not a bundle folder (expected a folder, found " +
                (fs::exists(v, ec) ? "a file" : "nothing") + ")");
  c.bundle_dir = fs::absolute(v).lexically_normal().string();
}
void apply_budget(RuntimeConfig& c, const std::string& v) {
  parse_budget(v, uint64_t{1} << 50);  // syntax check; a percentage is resolved when the store opens
  c.budget = v;
}
void apply_policy(RuntimeConfig& c, const std::string& v) {
  find_policy(v);  // throws for an unknown name
  c.store.policy = v;
}
void apply_frequencies(RuntimeConfig& c, const std::string& v) {
  if (v.empty()) throw Error("edgemoe.frequencies: expected a path to a JSON file, found ''");
  c.store.frequencies = v;
}
void apply_policy_weights(RuntimeConfig& c, const std::string& v) { c.store.policy_weights = parse_policy_weights(v); }
void apply_pin_experts(RuntimeConfig& c, const std::string& v) {
  c.store.pin_experts = parse_int("edgemoe.pin_experts", v, 0, 1L << 30);
}
void apply_io_mode(RuntimeConfig& c, const std::string& v) { c.store.io_mode = parse_io_mode(v); }
void apply_io_threads(RuntimeConfig& c, const std::string& v) {
  c.store.io_threads = static_cast<int>(parse_int("edgemoe.io_threads", v, 1, 256));
}
void apply_verify(RuntimeConfig& c, const std::string& v) { c.store.verify_checksums = parse_bool("edgemoe.verify_checksums", v); }
void apply_mlock(RuntimeConfig& c, const std::string& v) { c.store.arena.mlock = parse_bool("edgemoe.mlock", v); }
void apply_hugepages(RuntimeConfig& c, const std::string& v) { c.store.arena.hugepages = parse_bool("edgemoe.hugepages", v); }
void apply_store_id(RuntimeConfig& c, const std::string& v) { c.store.store_id = v; }
void apply_throttle_bw(RuntimeConfig& c, const std::string& v) { c.store.throttle_bw = parse_throttle_bw(v); }
void apply_throttle_latency(RuntimeConfig& c, const std::string& v) {
  c.store.throttle_latency_us = parse_throttle_latency_us(v);
}
void apply_predictor(RuntimeConfig& c, const std::string& v) {
  if (v != "none" && v != "auto" && !predictor_bit(v))
    throw Error("edgemoe.predictor: expected " + predictor_list("none", "auto") + ", found '" + v + "'");
  c.prefetch.predictor = v;
}
void apply_profile(RuntimeConfig& c, const std::string& v) {
  if (v.empty()) throw Error("edgemoe.profile: expected a path to a profile.json, found ''");
  c.prefetch.profile = v;
}
void apply_prefetch_depth(RuntimeConfig& c, const std::string& v) {
  c.prefetch.depth = static_cast<int32_t>(parse_int("edgemoe.prefetch_depth", v, 1, 8));
}
void apply_prefetch_threshold(RuntimeConfig& c, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || !(x > 0 && x <= 1))
    throw Error("edgemoe.prefetch_threshold: expected a probability in (0, 1], found '" + v + "'");
  c.prefetch.threshold = static_cast<float>(x);
}
void apply_warm_start(RuntimeConfig& c, const std::string& v) {
  if (v.empty()) throw Error("edgemoe.warm_start: expected 'profile' or a saved resident-set file, found ''");
  c.prefetch.warm_start = v;
}
void apply_routing(RuntimeConfig& c, const std::string& v) { c.routing.rule = parse_routing_rule(v); }
void apply_routing_lambda(RuntimeConfig& c, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || !(x >= 0 && x <= 100))
    throw Error("edgemoe.routing_lambda: expected a number in [0, 100], found '" + v + "'");
  c.routing.lambda = static_cast<float>(x);
}
void apply_routing_keep(RuntimeConfig& c, const std::string& v) {
  c.routing.keep = static_cast<int32_t>(parse_int("edgemoe.routing_keep", v, 0, 1024));
}
void apply_routing_window(RuntimeConfig& c, const std::string& v) {
  c.routing.window = static_cast<int32_t>(parse_int("edgemoe.routing_window", v, 0, 1024));
}
void apply_miss_precision(RuntimeConfig& c, const std::string& v) {
  if (v == "exact") c.precision.mode = MissPrecision::Exact;
  else if (v == "dynamic") c.precision.mode = MissPrecision::Dynamic;
  else throw Error("edgemoe.miss_precision: expected exact or dynamic, found '" + v + "'");
}
void apply_thresholds(RuntimeConfig& c, const std::string& v) {
  auto bad = [&] {
    return Error("edgemoe.thresholds: expected 'T1,T2' with 0 <= T1 < T2 <= 1 (e.g. '0.6,0.9'), found '" + v + "'");
  };
  const size_t comma = v.find(',');
  if (comma == std::string::npos) throw bad();
  auto num = [&](const std::string& t) {
    char* end = nullptr;
    const double x = std::strtod(t.c_str(), &end);
    if (t.empty() || end != t.c_str() + t.size() || !(x >= 0 && x <= 1)) throw bad();
    return static_cast<float>(x);
  };
  const float t1 = num(v.substr(0, comma)), t2 = num(v.substr(comma + 1));
  if (!(t1 < t2)) throw bad();
  c.precision.t1 = t1;
  c.precision.t2 = t2;
  c.precision.thresholds_given = true;
}
}  // namespace

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> table = {
      {"edgemoe.bundle_dir", "(required)", "bundle folder; the `manifest` attribute is resolved against it",
       apply_bundle_dir, true},
      {"edgemoe.budget", "whole store",
       "hard cap on expert bytes in memory (resident, in flight or queued): `268435456`, `256MB`, `1GiB` or `25%` "
       "(of the store; with low-bit twins, of the primaries' bytes)",
       apply_budget, false},
      {"edgemoe.policy", "lru", "cache policy: `lru`, `lfu`, `edgemoe`, `hobbit`, `pinned`, or `none` (no cache)",
       apply_policy, false},
      {"edgemoe.frequencies", "(none)",
       "JSON file `{\"expert_frequency\": [[...], ...]}` (one list per layer): the frequencies of `pinned` "
       "(required) and `edgemoe` (instead of counted uses)",
       apply_frequencies, false},
      {"edgemoe.policy_weights", "lru=0.25,lfu=0.25,lhu=0.25,fld=0.25", "weights of the `hobbit` policy, each in [0, 1]",
       apply_policy_weights, false},
      {"edgemoe.pin_experts", "as many as fit",
       "`pinned`: how many of the most frequent experts stay (default: as many as fit in budget - largest blob)",
       apply_pin_experts, false},
      {"edgemoe.io_mode", "direct",
       "`direct` (O_DIRECT), `buffered` (pread, readahead off, read pages dropped), `mmap` (copy from a mapping)",
       apply_io_mode, false},
      {"edgemoe.io_threads", "2", "I/O threads, `1..256`", apply_io_threads, false},
      {"edgemoe.verify_checksums", "1", "verify each blob's xxh3_64 on every read (`1`/`0`/`true`/`false`; `0` skips it)",
       apply_verify, false},
      {"edgemoe.mlock", "0", "lock expert memory in RAM (`mlock`; needs RLIMIT_MEMLOCK >= the budget)", apply_mlock,
       false},
      {"edgemoe.hugepages", "0", "ask for transparent huge pages for expert buffers of >= 2 MiB (`madvise`)",
       apply_hugepages, false},
      {"edgemoe.store_id", "bundle dir", "name under which statistics are published", apply_store_id, false},
      {"edgemoe.throttle_bw", "0 (off)",
       "emulated storage read bandwidth, bytes/s in `[1, 1e13]`: `41300000`, `2.5e7`, `90MB`, `1.5GiB` (units as the "
       "budget, no `%`)",
       apply_throttle_bw, false},
      {"edgemoe.throttle_latency_us", "0 (off)", "emulated per-read latency in microseconds, in `[0, 1e9]`",
       apply_throttle_latency, false},
      {"edgemoe.predictor", "auto",
       "which predictor drives prefetching: `none`, `table` (EdgeMoE), `gates` (HOBBIT stacked gates), `token`, "
       "`residual` (the next router on the residual stream: `ResidualPrefetch` nodes), "
       "`auto` (per layer what the profile measured best; `gates` alone without a profile)",
       apply_predictor, false},
      {"edgemoe.profile", "bundle's profile.json", "routing profile written by `edgemoe-profile` (absent: no `table`/`token`)",
       apply_profile, false},
      {"edgemoe.prefetch_depth", "1", "layers ahead the prefetcher may look when the next layer's experts are resident, `1..8`",
       apply_prefetch_depth, false},
      {"edgemoe.prefetch_threshold", "0.3", "prefetch experts predicted with probability >= this, in `(0, 1]`",
       apply_prefetch_threshold, false},
      {"edgemoe.warm_start", "(cold)",
       "`profile` (read the profile's most used experts at session start, in the background) or a resident-set file "
       "saved by `edgemoe_save_resident`",
       apply_warm_start, false},
      {"edgemoe.routing", "exact",
       "how `CacheAwareTopK` routes: `exact` (the router's own top-k, bit for bit), `cache-prior` (true top-J kept, "
       "the other slots by logits with resident experts raised by lambda x the layer's mean logit range), `max-rank` "
       "(true top-J kept, other slots to resident experts inside the true top-M)",
       apply_routing, false},
      {"edgemoe.routing_lambda", "0.5", "`cache-prior`: the bias, in units of the layer's mean logit range, `[0, 100]`",
       apply_routing_lambda, false},
      {"edgemoe.routing_keep", "1",
       "J, the true top experts always kept by `cache-prior` and `max-rank`, `0..1024` (0 with `cache-prior`: the "
       "paper's rule)",
       apply_routing_keep, false},
      {"edgemoe.routing_window", "2k", "`max-rank`: M, the true top-M a resident expert may come from, `0..1024` (0 = 2k)",
       apply_routing_window, false},
      {"edgemoe.miss_precision", "exact",
       "which copy a cache miss reads: `exact` (the primary, always) or `dynamic` (HOBBIT: by the use's unimportance "
       "s, the primary for s <= T1, the bundle's low-bit twin for T1 < s <= T2, nothing above T2)",
       apply_miss_precision, false},
      {"edgemoe.thresholds", "from the profile, else 0.6,0.9",
       "`dynamic`: `T1,T2`, 0 <= T1 < T2 <= 1 (default: the profile's gate weights give HOBBIT's 67/30/3 split)",
       apply_thresholds, false},
  };
  return table;
}

std::string config_keys_json() {
  nlohmann::ordered_json j = nlohmann::ordered_json::array();
  for (const auto& k : config_keys())
    j.push_back({{"key", k.name}, {"default", k.default_value}, {"doc", k.doc}, {"required", k.required}});
  return j.dump();
}

}  // namespace edgemoe
