// Policy parameters from files and config strings: expert frequencies and HOBBIT's weights.
#include <sys/stat.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "edgemoe/manifest.h"
#include "edgemoe/policy.h"

namespace edgemoe {

namespace {
constexpr uint64_t kMaxFrequencyFileBytes = uint64_t{64} << 20;
}

FrequencyTable load_frequencies(const std::string& path, const Manifest& m) {
  const std::string key = "edgemoe.frequencies";
  auto fail = [&](const std::string& field, const std::string& expected, const std::string& found) {
    return Error(path + ": " + field + ": expected " + expected + ", found " + found + " (" + key + ")");
  };
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw fail("file", "a readable JSON file", "nothing");
  if (!S_ISREG(st.st_mode)) throw fail("file", "a regular file", "not a regular file");
  if (static_cast<uint64_t>(st.st_size) > kMaxFrequencyFileBytes)
    throw fail("file", "at most 64 MiB", std::to_string(st.st_size) + " bytes");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail("file", "a readable JSON file", "an unreadable file");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) throw fail("file", "valid JSON", "a parse error");
  if (!j.is_object() || !j.contains("expert_frequency")) throw fail("expert_frequency", "a key of the top-level object", "nothing");
  const auto& f = j["expert_frequency"];
  if (!f.is_array() || f.size() != m.layers.size())
    throw fail("expert_frequency", "a list of " + std::to_string(m.layers.size()) + " lists (one per manifest layer)",
               f.is_array() ? std::to_string(f.size()) + " entries" : "another JSON type");
  FrequencyTable t;
  t.path = path;
  t.f.resize(m.layers.size());
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const auto& row = f[l];
    const size_t E = static_cast<size_t>(m.layers[l].num_experts);
    const std::string field = "expert_frequency[" + std::to_string(l) + "]";
    if (!row.is_array() || row.size() != E)
      throw fail(field, "a list of " + std::to_string(E) + " numbers (num_experts of layer " + std::to_string(l) + ")",
                 row.is_array() ? std::to_string(row.size()) + " entries" : "another JSON type");
    t.f[l].resize(E);
    for (size_t e = 0; e < E; ++e) {
      if (!row[e].is_number() || !std::isfinite(row[e].get<double>()) || row[e].get<double>() < 0)
        throw fail(field + "[" + std::to_string(e) + "]", "a finite number >= 0", "another value");
      t.f[l][e] = row[e].get<double>();
    }
  }
  return t;
}

HobbitWeights parse_policy_weights(const std::string& spec) {
  HobbitWeights w;
  auto bad = [&](const std::string& why) {
    return Error("edgemoe.policy_weights: expected comma-separated name=weight with names lru, lfu, lhu, fld and "
                 "weights in [0, 1] ('lru=0.25,lfu=0.25,lhu=0.25,fld=0.25'), found '" + spec + "' (" + why + ")");
  };
  std::stringstream ss(spec);
  std::string item;
  double sum = 0;
  while (std::getline(ss, item, ',')) {
    std::string s;
    for (char c : item)
      if (!std::isspace(static_cast<unsigned char>(c))) s += c;
    if (s.empty()) continue;
    const auto eq = s.find('=');
    if (eq == std::string::npos) throw bad("no '=' in '" + s + "'");
    const std::string name = s.substr(0, eq), val = s.substr(eq + 1);
    char* end = nullptr;
    const double v = std::strtod(val.c_str(), &end);
    if (val.empty() || *end != '\0' || !(v >= 0 && v <= 1)) throw bad("weight '" + val + "'");
    if (name == "lru") w.lru = v;
    else if (name == "lfu") w.lfu = v;
    else if (name == "lhu") w.lhu = v;
    else if (name == "fld") w.fld = v;
    else throw bad("unknown name '" + name + "'");
  }
  sum = w.lru + w.lfu + w.lhu + w.fld;
  if (!(sum > 0)) throw bad("all weights are 0");
  return w;
}

}  // namespace edgemoe
