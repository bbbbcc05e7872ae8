#include "edgemoe/warm_start.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "edgemoe/fd.h"

namespace edgemoe {

namespace {
constexpr const char* kFormat = "edgemoe-resident-set";
constexpr uint64_t kMaxFileBytes = uint64_t{64} << 20;
}  // namespace

std::vector<ExpertKey> warm_set(const std::string& spec, const Manifest& m, const RoutingProfile* profile) {
  std::vector<ExpertKey> keys;
  if (spec == "profile") {
    std::vector<std::pair<float, ExpertKey>> ranked;
    for (size_t l = 0; l < profile->layers.size(); ++l)
      for (size_t e = 0; e < profile->layers[l].prior.size(); ++e)
        ranked.emplace_back(profile->layers[l].prior[e], ExpertKey{static_cast<int32_t>(l), static_cast<int32_t>(e)});
    std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (const auto& r : ranked) keys.push_back(r.second);
    return keys;
  }
  const std::string& path = spec;
  auto fail = [&](const std::string& field, const std::string& expected, const std::string& found) {
    return Error(path + ": " + field + ": expected " + expected + ", found " + found + " (edgemoe.warm_start)");
  };
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw fail("file", "'profile' or a resident-set file saved earlier", "nothing");
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > kMaxFileBytes)
    throw fail("file", "a regular file of at most 64 MiB", "another file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail("file", "a readable file", "an unreadable one");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  if (const std::string deep = check_json_nesting(text); !deep.empty()) throw fail("file", "a JSON object", deep);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw fail("file", "a JSON object", "something else");
  const auto fmt = j.find("format");
  if (fmt == j.end() || !fmt->is_string() || fmt->get<std::string>() != kFormat)
    throw fail("format", std::string("\"") + kFormat + "\"", "another value");
  const std::string want = manifest_identity(m);
  const auto id = j.find("manifest_xxh3");
  if (id == j.end() || !id->is_string() || id->get<std::string>() != want)
    throw Error(path + ": manifest_xxh3: this resident set was saved for another bundle (expected " + want +
                ", found " + (id != j.end() ? json_summary(*id) : std::string("nothing")) +
                "); save it again from a session of this bundle (edgemoe.warm_start)");
  const auto ex = j.find("experts");
  if (ex == j.end() || !ex->is_array()) throw fail("experts", "a list of [layer, expert] pairs", "something else");
  for (size_t i = 0; i < ex->size(); ++i) {
    const auto& p = (*ex)[i];
    const std::string f = "experts[" + std::to_string(i) + "]";
    if (!p.is_array() || (p.size() != 2 && p.size() != 3) || !p[0].is_number_integer() || !p[1].is_number_integer() ||
        (p.size() == 3 && !(p[2].is_number_integer() && p[2].get<int64_t>() == kTwin)))
      throw fail(f, "a [layer, expert] pair of integers (or [layer, expert, 1] for a twin)", json_summary(p));
    const int64_t l = p[0].get<int64_t>(), e = p[1].get<int64_t>();
    const int32_t v = p.size() == 3 ? kTwin : kPrimary;
    if (l < 0 || l >= static_cast<int64_t>(m.layers.size()) || e < 0 || e >= m.layers[static_cast<size_t>(l)].num_experts ||
        (v == kTwin && !m.twin(l, e)))
      throw fail(f, "an expert of the manifest", json_summary(p));
    keys.push_back(ExpertKey{static_cast<int32_t>(l), static_cast<int32_t>(e), v});
  }
  return keys;
}

size_t warm_start(ExpertStore& store, const std::vector<ExpertKey>& keys) {
  if (!store.cache_enabled()) return 0;
  const Manifest& m = store.manifest();
  // Leave room for one layer's misses: the first demand reads must not wait behind warm reads for budget.
  int64_t k_max = 1;
  for (const auto& l : m.layers) k_max = std::max(k_max, l.top_k);
  const uint64_t reserve = static_cast<uint64_t>(k_max) * store.charge_of(m.largest_length());
  if (store.budget_bytes() <= reserve) return 0;
  const uint64_t room = store.budget_bytes() - reserve;
  uint64_t used = store.resident_bytes();
  const int32_t far = static_cast<int32_t>(m.layers.size()) + 1;  // behind every real prefetch
  size_t n = 0;
  for (const auto& k : keys) {
    const uint64_t c = store.charge_of(m.record(k.layer, k.expert, k.variant).length);
    if (used + c > room) continue;  // a smaller one may still fit
    if (store.prefetch(k.layer, k.expert, PrefetchHint{far, 1e-6f}, k.variant)) {
      used += c;
      ++n;
    }
  }
  return n;
}

namespace {
// The process's umask, read without changing it (umask(2) sets it: a race with other threads' file creation);
// /proc/self/status has it since Linux 4.7, else the common 022.
mode_t process_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::strtoul(line.c_str() + 6, nullptr, 8));
  return 022;
}
}  // namespace

void save_resident_set(const ExpertStore& store, const std::string& path) {
  nlohmann::ordered_json j;
  j["format"] = kFormat;
  j["version"] = 1;
  j["manifest_xxh3"] = manifest_identity(store.manifest());
  nlohmann::ordered_json ex = nlohmann::ordered_json::array();
  for (const auto& k : store.resident_keys()) {
    if (k.variant == kTwin) ex.push_back({k.layer, k.expert, kTwin});
    else ex.push_back({k.layer, k.expert});
  }
  j["experts"] = std::move(ex);
  // A temporary file of a fresh name (mkstemp: created exclusively, so no file of the user's is overwritten),
  // written in full, then renamed over `path`.
  std::string tmpl = path + ".XXXXXX";
  UniqueFd fd(::mkstemp(tmpl.data()));
  if (!fd) throw Error(path + ": cannot write the resident set (expected a writable folder): " + std::strerror(errno));
  const std::string text = j.dump(1) + "\n";
  bool ok = ::fchmod(fd.get(), 0666 & ~process_umask()) == 0;  // as a file open() creates (mkstemp: 0600)
  for (size_t done = 0; ok && done < text.size();) {
    const ssize_t w = ::write(fd.get(), text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    ok = w > 0;
    if (ok) done += static_cast<size_t>(w);
  }
  const int err = errno;
  fd.reset();
  if (!ok || std::rename(tmpl.c_str(), path.c_str()) != 0) {
    const int e = ok ? errno : err;
    std::remove(tmpl.c_str());
    throw Error(path + (ok ? ": cannot replace the file (rename failed: " : ": write failed (") + std::strerror(e) + ")");
  }
}

}  // namespace edgemoe
