#include "edgemoe/profile.h"

#define XXH_INLINE_ALL
#include <xxhash.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace edgemoe {

namespace {
using json = nlohmann::json;
constexpr uint64_t kMaxProfileBytes = uint64_t{512} << 20;

std::string read_file(const std::string& path, uint64_t max_bytes, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw Error(path + ": " + what + ": expected a readable file, found nothing");
  if (!S_ISREG(st.st_mode)) throw Error(path + ": " + what + ": expected a regular file, found another kind of file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    throw Error(path + ": " + what + ": expected at most " + std::to_string(max_bytes) + " bytes, found " +
                std::to_string(st.st_size));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": " + what + ": expected a readable file, found an unreadable one");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string short_dump(const json& v) { return json_summary(v, 60); }

class Checker {
 public:
  explicit Checker(std::string file) : file_(std::move(file)) {}
  [[noreturn]] void fail(const std::string& field, const std::string& expected, const std::string& found) const {
    throw Error(file_ + ": " + field + ": expected " + expected + ", found " + found);
  }
  const json& member(const json& obj, const char* key, const std::string& field) const {
    if (!obj.is_object()) fail(field.substr(0, field.rfind('.')), "a JSON object", short_dump(obj));
    auto it = obj.find(key);
    if (it == obj.end()) fail(field, "a value", "nothing");
    return *it;
  }
  const json& array(const json& obj, const char* key, const std::string& field) const {
    const json& v = member(obj, key, field);
    if (!v.is_array()) fail(field, "a list", short_dump(v));
    return v;
  }
  int64_t integer(const json& v, const std::string& field, int64_t lo, int64_t hi) const {
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
      fail(field, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]", short_dump(v));
    return v.get<int64_t>();
  }
  std::vector<int32_t> expert_set(const json& v, const std::string& field, int32_t E, int32_t K) const {
    if (!v.is_array() || v.size() < 1 || v.size() > static_cast<size_t>(K))
      fail(field, "a list of 1.." + std::to_string(K) + " experts", short_dump(v));
    std::vector<int32_t> out;
    for (size_t i = 0; i < v.size(); ++i)
      out.push_back(static_cast<int32_t>(integer(v[i], field + "[" + std::to_string(i) + "]", 0, E - 1)));
    for (size_t i = 1; i < out.size(); ++i)
      if (out[i] <= out[i - 1]) fail(field, "experts sorted ascending without repeats", short_dump(v));
    return out;
  }
  SparseDist dist(const json& v, const std::string& field, int32_t E) const {
    if (!v.is_array()) fail(field, "a list of [expert, p] pairs", short_dump(v));
    SparseDist d;
    d.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string f = field + "[" + std::to_string(i) + "]";
      const json& pr = v[i];
      if (!pr.is_array() || pr.size() != 2 || !pr[1].is_number()) fail(f, "an [expert, p] pair", short_dump(pr));
      const int32_t e = static_cast<int32_t>(integer(pr[0], f + "[0]", 0, E - 1));
      const double p = pr[1].get<double>();
      if (!(p > 0 && p <= 1)) fail(f + "[1]", "a probability in (0, 1]", short_dump(pr[1]));
      if (!d.empty() && static_cast<float>(p) > d.back().second)
        fail(f, "pairs sorted by p descending", short_dump(v));
      for (const auto& q : d)
        if (q.first == e) fail(f, "each expert once", short_dump(v));
      d.emplace_back(e, static_cast<float>(p));
    }
    return d;
  }

 private:
  std::string file_;
};

}  // namespace

const std::vector<std::string>& predictor_names() {
  static const std::vector<std::string> names = {"table", "gates", "token", "residual"};
  return names;
}

uint32_t predictor_bit(const std::string& name) {
  const std::vector<std::string>& names = predictor_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (name == names[i]) return 1u << i;
  return 0;
}

std::string predictor_list(const std::string& first, const std::string& last) {
  std::vector<std::string> all;
  if (!first.empty()) all.push_back(first);
  all.insert(all.end(), predictor_names().begin(), predictor_names().end());
  if (!last.empty()) all.push_back(last);
  std::string out;
  for (size_t i = 0; i < all.size(); ++i) {
    if (i) out += i + 1 == all.size() ? " or " : ", ";
    out += all[i];
  }
  return out;
}

std::string RoutingProfile::key(const std::vector<int32_t>& prev1) {
  std::string k;
  for (int32_t e : prev1) k += std::to_string(e) + ",";
  return k;
}

std::string RoutingProfile::key(const std::vector<int32_t>& prev2, const std::vector<int32_t>& prev1) {
  return key(prev2) + "|" + key(prev1);
}

std::string manifest_identity(const Manifest& m) {
  const std::string bytes = read_file(m.manifest_path.string(), uint64_t{1} << 30, "manifest");
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(XXH3_64bits(bytes.data(), bytes.size())));
  return b;
}

RoutingProfile load_profile(const std::string& path, const Manifest& m) {
  const std::string text = read_file(path, kMaxProfileBytes, "profile (edgemoe.profile)");
  Checker c(path);
  if (const std::string deep = check_json_nesting(text); !deep.empty()) c.fail("file", "valid JSON", deep);
  json doc = json::parse(text, nullptr, false);
  if (doc.is_discarded()) c.fail("file", "valid JSON", "a parse error");
  if (!doc.is_object()) c.fail("file", "a JSON object", short_dump(doc));
  const json& fmt = c.member(doc, "format", "format");
  if (fmt != "edgemoe-profile") c.fail("format", "\"edgemoe-profile\"", short_dump(fmt));
  c.integer(c.member(doc, "version", "version"), "version", 1, 1);
  const json& ident = c.member(c.member(doc, "bundle", "bundle"), "manifest_xxh3", "bundle.manifest_xxh3");
  const std::string want = manifest_identity(m);
  if (!ident.is_string() || ident.get<std::string>() != want)
    throw Error(path + ": bundle.manifest_xxh3: the profile was made for another bundle (expected " + want +
                ", found " + short_dump(ident) + "); run edgemoe-profile again");

  RoutingProfile p;
  p.path = path;
  const json& layers = c.array(doc, "layers", "layers");
  if (layers.size() != m.layers.size())
    c.fail("layers", std::to_string(m.layers.size()) + " entries (the manifest's layers)",
           std::to_string(layers.size()));
  const json& autos = c.array(doc, "auto", "auto");
  if (autos.size() != m.layers.size())
    c.fail("auto", std::to_string(m.layers.size()) + " lists (one per layer)", std::to_string(autos.size()));
  p.layers.resize(m.layers.size());
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const std::string f = "layers[" + std::to_string(l) + "]";
    const json& L = layers[l];
    LayerProfile& lp = p.layers[l];
    const LayerInfo& info = m.layers[l];
    c.integer(c.member(L, "layer", f + ".layer"), f + ".layer", static_cast<int64_t>(l), static_cast<int64_t>(l));
    lp.num_experts = static_cast<int32_t>(
        c.integer(c.member(L, "num_experts", f + ".num_experts"), f + ".num_experts", info.num_experts, info.num_experts));
    lp.top_k = static_cast<int32_t>(c.integer(c.member(L, "top_k", f + ".top_k"), f + ".top_k", info.top_k, info.top_k));
    const int32_t E = lp.num_experts, K = lp.top_k;
    const int64_t seen = c.integer(c.member(L, "tokens_seen", f + ".tokens_seen"), f + ".tokens_seen", 0, INT64_MAX / 4);
    const json& freq = c.array(L, "frequency", f + ".frequency");
    if (freq.size() != static_cast<size_t>(E)) c.fail(f + ".frequency", std::to_string(E) + " counts", std::to_string(freq.size()));
    lp.prior.assign(static_cast<size_t>(E), 0.0f);
    for (int32_t e = 0; e < E; ++e) {
      const int64_t n = c.integer(freq[static_cast<size_t>(e)], f + ".frequency[" + std::to_string(e) + "]", 0, seen);
      lp.prior[static_cast<size_t>(e)] = seen > 0 ? static_cast<float>(static_cast<double>(n) / static_cast<double>(seen)) : 0.0f;
    }
    const json& tr = c.member(L, "transitions", f + ".transitions");
    for (const char* order : {"order1", "order2"}) {
      const std::string fo = f + ".transitions." + order;
      const json& rows = c.array(tr, order, fo);
      const size_t need_prev = order[5] == '1' ? 1 : 2;
      if (!rows.empty() && l < need_prev) c.fail(fo, "[] (no earlier layers)", std::to_string(rows.size()) + " entries");
      auto& table = need_prev == 1 ? lp.order1 : lp.order2;
      for (size_t i = 0; i < rows.size(); ++i) {
        const std::string fr = fo + "[" + std::to_string(i) + "]";
        const json& prev = c.array(rows[i], "prev", fr + ".prev");
        if (prev.size() != need_prev) c.fail(fr + ".prev", std::to_string(need_prev) + " expert lists", std::to_string(prev.size()));
        std::vector<std::vector<int32_t>> sets;
        for (size_t j = 0; j < need_prev; ++j) {
          const LayerInfo& src = m.layers[l - need_prev + j];
          sets.push_back(c.expert_set(prev[j], fr + ".prev[" + std::to_string(j) + "]",
                                      static_cast<int32_t>(src.num_experts), static_cast<int32_t>(src.top_k)));
        }
        const std::string k = need_prev == 1 ? RoutingProfile::key(sets[0]) : RoutingProfile::key(sets[0], sets[1]);
        if (table.count(k)) c.fail(fr + ".prev", "each key once", short_dump(prev));
        table.emplace(k, c.dist(c.member(rows[i], "next", fr + ".next"), fr + ".next", E));
      }
    }
    const json& tok = c.member(L, "tokens", f + ".tokens");
    const json& ids = c.array(tok, "ids", f + ".tokens.ids");
    const json& nxt = c.array(tok, "next", f + ".tokens.next");
    if (ids.size() != nxt.size())
      c.fail(f + ".tokens.next", std::to_string(ids.size()) + " entries (one per id)", std::to_string(nxt.size()));
    int64_t prev_id = -1;
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string fi = f + ".tokens.ids[" + std::to_string(i) + "]";
      const int64_t id = c.integer(ids[i], fi, 0, INT64_MAX);
      if (id <= prev_id) c.fail(fi, "ids sorted ascending without repeats", std::to_string(id));
      prev_id = id;
      lp.tokens.emplace(id, c.dist(nxt[i], f + ".tokens.next[" + std::to_string(i) + "]", E));
    }
    {  // gate_weights: {"edges": [>= 2 increasing numbers in [0, 1]], "counts": K rows of len(edges) - 1 ints >= 0}
      const std::string fg = f + ".gate_weights";
      const json& gw = c.member(L, "gate_weights", fg);
      const json& edges = c.array(gw, "edges", fg + ".edges");
      if (edges.size() < 2) c.fail(fg + ".edges", "at least 2 edges", std::to_string(edges.size()));
      for (size_t i = 0; i < edges.size(); ++i) {
        const std::string fe = fg + ".edges[" + std::to_string(i) + "]";
        if (!edges[i].is_number() || !(edges[i].get<double>() >= 0 && edges[i].get<double>() <= 1))
          c.fail(fe, "a number in [0, 1]", short_dump(edges[i]));
        const double x = edges[i].get<double>();
        if (i > 0 && !(x > lp.gate_edges.back()))
          c.fail(fe, "increasing edges (> " + short_dump(edges[i - 1]) + ")", short_dump(edges[i]));
        lp.gate_edges.push_back(x);
      }
      const json& counts = c.array(gw, "counts", fg + ".counts");
      if (counts.size() != static_cast<size_t>(K))
        c.fail(fg + ".counts", std::to_string(K) + " rows (one per rank)", std::to_string(counts.size()));
      for (size_t r = 0; r < counts.size(); ++r) {
        const std::string fr = fg + ".counts[" + std::to_string(r) + "]";
        if (!counts[r].is_array() || counts[r].size() != edges.size() - 1)
          c.fail(fr, std::to_string(edges.size() - 1) + " counts", short_dump(counts[r]));
        std::vector<uint64_t> row;
        for (size_t b = 0; b < counts[r].size(); ++b)
          row.push_back(static_cast<uint64_t>(c.integer(counts[r][b], fr + "[" + std::to_string(b) + "]", 0, INT64_MAX)));
        lp.gate_counts.push_back(std::move(row));
      }
    }
    const json& a = autos[l];
    const std::string fa = "auto[" + std::to_string(l) + "]";
    if (!a.is_array()) c.fail(fa, "a list of predictor names", short_dump(a));
    for (size_t i = 0; i < a.size(); ++i) {
      const uint32_t bit = a[i].is_string() ? predictor_bit(a[i].get<std::string>()) : 0;
      if (!bit) c.fail(fa + "[" + std::to_string(i) + "]", "a predictor name (" + predictor_list("", "") + ")", short_dump(a[i]));
      lp.auto_members |= bit;
    }
  }
  return p;
}

}  // namespace edgemoe
