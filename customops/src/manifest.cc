// Manifest reader + validator. Mirrors the checks of edgemoe_ort/bundle/reader.py (same fields, same rules,
// same message shape) so a bundle the Python side accepts is accepted here and vice versa.
#include "edgemoe/manifest.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>
#include <unordered_map>

#include "edgemoe/fd.h"

namespace edgemoe {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string clip(const std::string& s, size_t max_chars) {
  if (s.size() <= max_chars) return s;
  return s.substr(0, max_chars > 3 ? max_chars - 3 : 0) + "...";
}

std::string error_message(const std::string& file_in, int64_t layer, int64_t expert, const std::string& field_in,
                          const std::string& message_in, const std::string& expected_in,
                          const std::string& found_in) {
  // Every part is clipped (kMaxMessagePart): a huge value in a bundle never makes a huge message.
  const std::string file = clip(file_in, kMaxPathBytes + 256), field = clip(field_in, kMaxMessagePart),
                    message = clip(message_in, kMaxMessagePart), expected = clip(expected_in, kMaxMessagePart),
                    found = clip(found_in, kMaxMessagePart);
  std::string out = file;
  if (layer >= 0 && expert >= 0) {
    out += ": layer " + std::to_string(layer) + " expert " + std::to_string(expert);
  } else if (layer >= 0) {
    out += ": layer " + std::to_string(layer);
  }
  if (!field.empty()) out += ": " + field;
  std::string ef;
  if (!expected.empty()) ef = "expected " + expected;
  if (!found.empty()) ef += (ef.empty() ? "" : ", ") + std::string("found ") + found;
  std::string tail = message;
  if (!ef.empty()) tail = message.empty() ? ef : message + " (" + ef + ")";
  if (!tail.empty()) out += ": " + tail;
  return out;
}

Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "relu") return Activation::Relu;
  if (name == "swiglu_oai") return Activation::SwigluOai;
  throw Error("unknown activation '" + name + "' (expected one of silu, gelu, gelu_tanh, relu, swiglu_oai)");
}

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::Silu: return "silu";
    case Activation::Gelu: return "gelu";
    case Activation::GeluTanh: return "gelu_tanh";
    case Activation::Relu: return "relu";
    case Activation::SwigluOai: return "swiglu_oai";
  }
  return "?";
}

const ExpertRecord& Manifest::record(int64_t layer, int64_t expert, int32_t variant) const {
  if (layer < 0 || layer >= static_cast<int64_t>(experts.size()) || expert < 0 ||
      expert >= static_cast<int64_t>(experts[static_cast<size_t>(layer)].size()) ||
      (variant != kPrimary && variant != kTwin)) {
    throw Error(error_message(manifest_path.string(), layer, expert, "", "no such expert",
                              "layer < " + std::to_string(experts.size()) + " and expert < num_experts",
                              "no record"));
  }
  if (variant == kTwin) {
    const ExpertRecord* t = twin(layer, expert);
    if (!t) throw Error(error_message(manifest_path.string(), layer, expert, "", "no such twin", "a twin record", "none"));
    return *t;
  }
  return experts[static_cast<size_t>(layer)][static_cast<size_t>(expert)];
}

const ExpertRecord* Manifest::twin(int64_t layer, int64_t expert) const {
  if (twins.empty() || layer < 0 || layer >= static_cast<int64_t>(twins.size()) || expert < 0 ||
      expert >= static_cast<int64_t>(twins[static_cast<size_t>(layer)].size()))
    return nullptr;
  const auto& t = twins[static_cast<size_t>(layer)][static_cast<size_t>(expert)];
  return t ? &*t : nullptr;
}

uint64_t Manifest::largest_length() const {
  uint64_t m = 0;
  for (const auto& l : experts)
    for (const auto& r : l) m = std::max(m, r.length);
  for (const auto& l : twins)
    for (const auto& r : l)
      if (r) m = std::max(m, r->length);
  return m;
}

uint64_t Manifest::primary_bytes() const {
  uint64_t n = 0;
  for (const auto& l : experts)
    for (const auto& r : l) n += r.length;
  return n;
}

size_t Manifest::num_experts() const { return layer_base_.empty() ? 0 : layer_base_.back(); }

size_t Manifest::num_records() const { return num_experts() * (has_twins() ? 2 : 1); }

size_t Manifest::record_index(int64_t layer, int64_t expert, int32_t variant) const {
  (void)record(layer, expert, variant);  // bounds check
  return (variant == kTwin ? num_experts() : 0) + layer_base_[static_cast<size_t>(layer)] + static_cast<size_t>(expert);
}

const std::vector<ReaderLimit>& reader_limits() {
  static const std::vector<ReaderLimit> table = {
      {"max_manifest_bytes", kMaxManifestBytes, "size of manifest.json"},
      {"max_json_depth", kMaxJsonDepth, "lists/objects nested in a JSON file a reader parses"},
      {"max_path_bytes", kMaxPathBytes, "a bundle-relative path (store.file, graphs, tokenizer, the manifest attribute)"},
      {"max_message_part", kMaxMessagePart, "characters of each part of an error message"},
      {"max_experts", static_cast<uint64_t>(kMaxExperts), "num_experts of a layer"},
      {"max_dim", static_cast<uint64_t>(kMaxDim), "hidden, intermediate and group_size"},
  };
  return table;
}

std::string check_relative_path(const std::string& rel) {
  if (rel.empty()) return "a non-empty relative path";
  if (rel.size() > kMaxPathBytes) return "a path of at most " + std::to_string(kMaxPathBytes) + " bytes";
  if (rel.find('\\') != std::string::npos || rel.find('\0') != std::string::npos) return "a relative POSIX path";
  if (rel[0] == '/' || (rel.size() > 1 && rel[1] == ':')) return "a relative path (not absolute)";
  size_t start = 0;
  while (true) {  // every component: non-empty, not '.', not '..'
    const size_t end = std::min(rel.find('/', start), rel.size());
    const std::string part = rel.substr(start, end - start);
    if (part == "..") return "a path inside the bundle (without '..')";
    if (part.empty() || part == ".")
      return "a path without empty or '.' components (no '//', trailing '/' or '/./')";
    if (end == rel.size()) break;
    start = end + 1;
  }
  return {};
}

std::string check_json_nesting(const std::string& text, size_t max_depth) {
  // Brackets outside strings; a backslash inside a string escapes the next byte. Malformed text is left to
  // the parser (this only bounds the depth of what it may build).
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        return "at most " + std::to_string(max_depth) + " levels of nested lists/objects (found more at byte " +
               std::to_string(i) + ")";
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return {};
}

std::string json_summary(const nlohmann::json& v, size_t max_chars) {
  // Iterative and bounded: at most max_chars characters, however large or deep the value (nlohmann's dump()
  // recurses once per level and copies the whole value).
  std::string out;
  struct Frame {
    const json* v;
    json::const_iterator it;
  };
  std::vector<Frame> stack;
  auto put = [&](const json& x) {  // a scalar, or the opening of a container (pushed)
    if (x.is_array() || x.is_object()) {
      out += x.is_array() ? '[' : '{';
      stack.push_back({&x, x.cbegin()});
    } else if (x.is_string()) {
      const std::string& str = x.get_ref<const std::string&>();
      out += json(str.substr(0, max_chars)).dump(-1, ' ', false, json::error_handler_t::replace);
    } else {
      out += x.dump();
    }
  };
  put(v);
  while (!stack.empty() && out.size() <= max_chars) {
    Frame& f = stack.back();
    if (f.it == f.v->cend()) {
      out += f.v->is_array() ? ']' : '}';
      stack.pop_back();
      continue;
    }
    if (f.it != f.v->cbegin()) out += ", ";
    const json::const_iterator cur = f.it++;
    if (f.v->is_object()) {
      out += json(cur.key().substr(0, max_chars)).dump(-1, ' ', false, json::error_handler_t::replace) + ": ";
    }
    put(*cur);  // may push: `f` is not used after this
  }
  return clip(out, max_chars);
}

namespace {

// A value of the bundle quoted in a message: bounded.
std::string squote(const std::string& s) { return "'" + clip(s, 64) + "'"; }

std::string dump(const json& v) { return json_summary(v, 80); }

// The manifest's bytes, from one descriptor opened without blocking (a FIFO or device put in its place fails
// at once instead of hanging) and checked to be a regular file of at most kMaxManifestBytes.
std::string read_manifest_file(const fs::path& path) {
  const std::string file = path.string();
  auto fail = [&](const std::string& message, const std::string& expected, const std::string& found) {
    return Error(error_message(file, -1, -1, "", message, expected, found));
  };
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) {
    const int err = errno;
    throw fail("cannot open manifest", "a readable file", err == ENOENT ? "nothing" : std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw fail("cannot stat manifest", "a readable file", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw fail("", "a regular file", "another kind of file");
  if (static_cast<uint64_t>(st.st_size) > kMaxManifestBytes)
    throw fail("manifest too large", "at most " + std::to_string(kMaxManifestBytes) + " bytes",
               std::to_string(st.st_size) + " bytes");
  const int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl >= 0) (void)::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK);
  std::string text;
  text.resize(static_cast<size_t>(st.st_size) + 1);  // one more: a file that grew is seen
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t r = ::read(fd.get(), &text[done], text.size() - done);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw fail("cannot read manifest", "a readable file", std::strerror(errno));
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  if (done > static_cast<size_t>(st.st_size)) throw fail("manifest changed while being read", "a stable file", "one that grew");
  text.resize(done);
  return text;
}

// Where `p` leads once symlinks are resolved, if that lies outside `root` (resolved too); empty if inside or
// if it cannot be resolved (a missing file is reported by the caller's own check).
std::string resolved_outside(const fs::path& root, const fs::path& p) {
  std::error_code ec;
  const fs::path r = fs::canonical(root, ec);
  if (ec) return {};
  const fs::path q = fs::canonical(p, ec);
  if (ec) return {};
  auto qit = q.begin();
  for (auto rit = r.begin(); rit != r.end(); ++rit, ++qit)
    if (qit == q.end() || *qit != *rit) return q.string();
  return {};
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

class Validator {
 public:
  explicit Validator(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& message, const std::string& expected,
                         const std::string& found, int64_t layer = -1, int64_t expert = -1) const {
    throw Error(error_message(file_, layer, expert, field, message, expected, found));
  }

  const json& get(const json& obj, const char* key, const std::string& field, json::value_t kind,
                  const char* kind_name, int64_t layer = -1, int64_t expert = -1) const {
    auto it = obj.find(key);
    if (it == obj.end()) fail(field, "missing", std::string("a JSON ") + kind_name, "nothing", layer, expert);
    bool ok = false;
    switch (kind) {
      case json::value_t::number_integer:
        ok = it->is_number_integer();
        break;
      case json::value_t::boolean: ok = it->is_boolean(); break;
      case json::value_t::string: ok = it->is_string(); break;
      case json::value_t::object: ok = it->is_object(); break;
      case json::value_t::array: ok = it->is_array(); break;
      default: break;
    }
    if (!ok) fail(field, "", std::string("a JSON ") + kind_name, dump(*it), layer, expert);
    return *it;
  }

  int64_t get_int(const json& obj, const char* key, const std::string& field, int64_t lo, int64_t layer = -1,
                  int64_t expert = -1) const {
    const json& v = get(obj, key, field, json::value_t::number_integer, "int", layer, expert);
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(field, "", "an int < 2^63", dump(v), layer, expert);
    int64_t x = v.get<int64_t>();
    if (x < lo) fail(field, "", ">= " + std::to_string(lo), std::to_string(x), layer, expert);
    return x;
  }

  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

struct WantTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  TensorRef ExpertRecord::*slot;
};

}  // namespace

Manifest load_manifest(const fs::path& bundle_dir_in, const std::string& manifest_rel) {
  Manifest m;
  std::error_code ec;
  fs::path bundle_dir = fs::absolute(bundle_dir_in, ec);
  if (ec) bundle_dir = bundle_dir_in;
  m.bundle_dir = bundle_dir;
  if (!fs::is_directory(bundle_dir, ec)) {
    throw Error(error_message(bundle_dir.string(), -1, -1, "edgemoe.bundle_dir", "not a bundle folder",
                              "a folder", fs::exists(bundle_dir, ec) ? "a file" : "nothing"));
  }
  std::string why = check_relative_path(manifest_rel);
  if (!why.empty()) {
    throw Error(error_message(bundle_dir.string(), -1, -1, "manifest (attribute)", "", why, squote(manifest_rel)));
  }
  m.manifest_path = bundle_dir / manifest_rel;
  const std::string mfile = m.manifest_path.string();
  // Every file the reader opens lies inside the bundle once symlinks are resolved (docs/bundle-format.md).
  why = resolved_outside(bundle_dir, m.manifest_path);
  if (!why.empty())
    throw Error(error_message(mfile, -1, -1, "manifest", "", "a path inside the bundle",
                              squote(manifest_rel) + " -> " + clip(why, 256)));
  const std::string text = read_manifest_file(m.manifest_path);
  why = check_json_nesting(text, kMaxJsonDepth);
  if (!why.empty()) throw Error(error_message(mfile, -1, -1, "", "nested too deeply", why, ""));
  // JSON text holds no raw NUL (inside a string it is written \u0000); nlohmann's parser would take one for
  // the end of the input and ignore what follows it, where the Python reader refuses the whole file.
  if (const size_t nul = text.find('\0'); nul != std::string::npos)
    throw Error(error_message(mfile, -1, -1, "", "not valid JSON: a NUL byte at offset " + std::to_string(nul)));
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& ex) {
    throw Error(error_message(mfile, -1, -1, "", std::string("not valid JSON: ") + ex.what()));
  }
  Validator v(mfile);
  if (!doc.is_object()) v.fail("", "", "a JSON object", dump(doc));
  {
    auto it = doc.find("format");
    if (it == doc.end() || !it->is_string() || it->get<std::string>() != "edgemoe-bundle")
      v.fail("format", "", "'edgemoe-bundle'", it == doc.end() ? "nothing" : dump(*it));
    auto vt = doc.find("format_version");
    if (vt == doc.end() || !vt->is_number_integer() || (vt->get<int64_t>() != 1 && vt->get<int64_t>() != 2))
      v.fail("format_version", "unsupported format version", "1 or 2", vt == doc.end() ? "nothing" : dump(*vt));
    m.format_version = static_cast<int>(vt->get<int64_t>());
  }

  // --- store -------------------------------------------------------------------------------------------
  const json& store = v.get(doc, "store", "store", json::value_t::object, "object");
  const json& sfile = v.get(store, "file", "store.file", json::value_t::string, "string");
  const std::string srel = sfile.get<std::string>();
  why = check_relative_path(srel);
  if (!why.empty()) v.fail("store.file", "", why, squote(srel));
  m.store_path = bundle_dir / srel;
  m.alignment = static_cast<uint64_t>(v.get_int(store, "alignment", "store.alignment", 1));
  if (m.alignment != 4096) v.fail("store.alignment", "", "4096", std::to_string(m.alignment));
  m.store_size = static_cast<uint64_t>(v.get_int(store, "size", "store.size", 0));
  if (m.store_size % m.alignment)
    v.fail("store.size", "", "a multiple of " + std::to_string(m.alignment), std::to_string(m.store_size));
  {
    auto ct = store.find("checksum");
    if (ct == store.end() || !ct->is_string() || ct->get<std::string>() != "xxh3_64")
      v.fail("store.checksum", "", "'xxh3_64'", ct == store.end() ? "nothing" : dump(*ct));
  }
  why = resolved_outside(bundle_dir, m.store_path);
  if (!why.empty()) v.fail("store.file", "", "a path inside the bundle", squote(srel) + " -> " + clip(why, 256));
  struct stat st {};
  if (::stat(m.store_path.c_str(), &st) != 0) {
    int err = errno;
    throw Error(error_message(m.store_path.string(), -1, -1, "store.file", "missing store", "an existing file",
                              err == ENOENT ? "nothing" : std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    throw Error(error_message(m.store_path.string(), -1, -1, "store.file", "", "a regular file", "not a file"));
  }
  const uint64_t actual = static_cast<uint64_t>(st.st_size);
  if (actual != m.store_size) {
    throw Error(error_message(m.store_path.string(), -1, -1, "size (manifest store.size)",
                              actual < m.store_size ? "truncated store" : "store size mismatch",
                              std::to_string(m.store_size), std::to_string(actual)));
  }

  // --- layers ------------------------------------------------------------------------------------------
  const json& layers = v.get(doc, "layers", "layers", json::value_t::array, "list");
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string f = "layers[" + std::to_string(i) + "]";
    const json& L = layers[i];
    if (!L.is_object()) v.fail(f, "", "a JSON object", dump(L));
    LayerInfo li;
    const int64_t idx = v.get_int(L, "layer", f + ".layer", 0);
    if (idx != static_cast<int64_t>(i))
      v.fail(f + ".layer", "layers must be listed in order", std::to_string(i), std::to_string(idx));
    const int64_t il = static_cast<int64_t>(i);
    li.layer = static_cast<int32_t>(i);
    li.num_experts = v.get_int(L, "num_experts", f + ".num_experts", 1, il);
    if (li.num_experts > kMaxExperts)
      v.fail(f + ".num_experts", "", "<= 2^20", std::to_string(li.num_experts), il);
    li.top_k = v.get_int(L, "top_k", f + ".top_k", 1, il);
    if (li.top_k > li.num_experts)
      v.fail(f + ".top_k", "", "<= num_experts (" + std::to_string(li.num_experts) + ")", std::to_string(li.top_k), il);
    li.hidden = v.get_int(L, "hidden", f + ".hidden", 1, il);
    li.intermediate = v.get_int(L, "intermediate", f + ".intermediate", 1, il);
    // Caps keep every product of dimensions (rows * cols * 4 bytes, tokens * rows) far from int64 overflow.
    if (li.hidden > kMaxDim) v.fail(f + ".hidden", "", "<= 2^24", std::to_string(li.hidden), il);
    if (li.intermediate > kMaxDim)
      v.fail(f + ".intermediate", "", "<= 2^24", std::to_string(li.intermediate), il);
    li.gated = v.get(L, "gated", f + ".gated", json::value_t::boolean, "bool", il).get<bool>();
    const std::string act = v.get(L, "activation", f + ".activation", json::value_t::string, "string", il);
    try {
      li.activation = parse_activation(act);
    } catch (const Error&) {
      v.fail(f + ".activation", "", "one of silu, gelu, gelu_tanh, relu, swiglu_oai", squote(act), il);
    }
    if (li.activation == Activation::SwigluOai && !li.gated)
      v.fail(f + ".gated", "", "true for activation swiglu_oai", "false", il);
    m.layers.push_back(li);
  }

  // --- expert records ----------------------------------------------------------------------------------
  // Nothing is sized by num_experts before every record is checked: the tables are built at the end, when
  // sum(num_experts) == number of records (each at least one aligned block inside the store). A small
  // manifest claiming 2^20 experts per layer costs what its records cost, not 2^20 entries per layer.
  const json& recs = v.get(doc, "experts", "experts", json::value_t::array, "list");
  std::vector<ExpertRecord> parsed;
  parsed.reserve(recs.size());
  std::unordered_map<uint64_t, size_t> where;  // (layer << 32 | expert << 1 | variant) -> index in recs
  where.reserve(recs.size());
  auto key_of = [](int64_t l, int64_t e, int64_t variant = kPrimary) {
    return static_cast<uint64_t>(l) << 32 | static_cast<uint64_t>(e) << 1 | static_cast<uint64_t>(variant);
  };
  for (size_t n = 0; n < recs.size(); ++n) {
    const std::string f = "experts[" + std::to_string(n) + "]";
    const json& R = recs[n];
    if (!R.is_object()) v.fail(f, "", "a JSON object", dump(R));
    const int64_t li = v.get_int(R, "layer", f + ".layer", 0);
    if (li >= static_cast<int64_t>(m.layers.size()))
      v.fail(f + ".layer", "", "< " + std::to_string(m.layers.size()) + " (number of layers)", std::to_string(li));
    const LayerInfo& lay = m.layers[static_cast<size_t>(li)];
    const int64_t e = v.get_int(R, "expert", f + ".expert", 0, li);
    if (e >= lay.num_experts)
      v.fail(f + ".expert", "", "< num_experts (" + std::to_string(lay.num_experts) + ")", std::to_string(e), li);
    int64_t variant = kPrimary;
    if (auto vr = R.find("variant"); vr != R.end()) {
      if (m.format_version < 2)
        v.fail(f + ".variant", "", "no variant in format_version 1", dump(*vr), li, e);
      if (!vr->is_number_integer() || (vr->get<int64_t>() != kPrimary && vr->get<int64_t>() != kTwin))
        v.fail(f + ".variant", "", "one of 0, 1", dump(*vr), li, e);
      variant = vr->get<int64_t>();
    }
    const auto seen = where.emplace(key_of(li, e, variant), n);
    if (!seen.second)
      v.fail(f, variant == kTwin ? "duplicate twin record" : "duplicate expert record", "one record",
             "another at experts[" + std::to_string(seen.first->second) + "]", li, e);

    ExpertRecord r;
    r.layer = static_cast<int32_t>(li);
    r.expert = static_cast<int32_t>(e);
    r.variant = static_cast<int32_t>(variant);
    r.offset = static_cast<uint64_t>(v.get_int(R, "offset", f + ".offset", 0, li, e));
    r.length = static_cast<uint64_t>(v.get_int(R, "length", f + ".length", 1, li, e));
    r.size = static_cast<uint64_t>(v.get_int(R, "size", f + ".size", 0, li, e));
    const std::string A = std::to_string(m.alignment);
    if (r.offset % m.alignment)
      v.fail(f + ".offset", "misaligned offset", "a multiple of " + A, std::to_string(r.offset), li, e);
    if (r.length % m.alignment)
      v.fail(f + ".length", "misaligned length", "a multiple of " + A, std::to_string(r.length), li, e);
    if (r.size > r.length)
      v.fail(f + ".size", "", "<= length (" + std::to_string(r.length) + ")", std::to_string(r.size), li, e);
    if (r.offset > m.store_size || r.length > m.store_size - r.offset)
      v.fail(f + ".offset + length", "record past the end of the store",
             "<= store.size (" + std::to_string(m.store_size) + ")", std::to_string(r.offset + r.length), li, e);
    r.checksum_hex = v.get(R, "checksum", f + ".checksum", json::value_t::string, "string", li, e).get<std::string>();
    bool hex_ok = r.checksum_hex.size() == 16 &&
                  std::all_of(r.checksum_hex.begin(), r.checksum_hex.end(),
                              [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
    if (!hex_ok) v.fail(f + ".checksum", "", "16 lowercase hex digits", squote(r.checksum_hex), li, e);
    r.checksum = std::stoull(r.checksum_hex, nullptr, 16);

    const json& fmt = v.get(R, "format", f + ".format", json::value_t::object, "object", li, e);
    const std::string dtype =
        v.get(fmt, "dtype", f + ".format.dtype", json::value_t::string, "string", li, e).get<std::string>();
    const FormatTraits* ft = find_format(dtype);
    if (!ft) v.fail(f + ".format.dtype", "unknown dtype", "one of " + format_names(), squote(dtype), li, e);
    r.dtype = ft->dtype;
    const bool quant = ft->grouped;
    auto sch = fmt.find("scheme");
    if (quant) {
      r.group_size = v.get_int(fmt, "group_size", f + ".format.group_size", 1, li, e);
      if (r.group_size > kMaxDim)
        v.fail(f + ".format.group_size", "", "<= 2^24", std::to_string(r.group_size), li, e);
      if (sch == fmt.end() || !sch->is_string() || sch->get<std::string>() != ft->scheme)
        v.fail(f + ".format.scheme", "", squote(ft->scheme), sch == fmt.end() ? "nothing" : dump(*sch), li, e);
    } else if (sch != fmt.end() && !sch->is_null() && !(sch->is_string() && sch->get<std::string>() == "none")) {
      v.fail(f + ".format.scheme", "", "'none'", dump(*sch), li, e);
    }

    // expected tensors
    const int64_t H = lay.hidden, I = lay.intermediate, rows_in = lay.gated ? 2 * I : I;
    const char* wdt = ft->tensor_dtype;
    std::vector<WantTensor> want;
    want.push_back({"w_in", wdt, {rows_in, H}, &ExpertRecord::w_in});
    want.push_back({"w_out", wdt, {H, I}, &ExpertRecord::w_out});
    if (quant) {
      const int64_t g_in = (H - 1) / r.group_size + 1, g_out = (I - 1) / r.group_size + 1;
      want.push_back({"w_in.scales", "f16", {rows_in, g_in}, &ExpertRecord::w_in_scales});
      want.push_back({"w_in.zeros", "u8", {rows_in, g_in}, &ExpertRecord::w_in_zeros});
      want.push_back({"w_out.scales", "f16", {H, g_out}, &ExpertRecord::w_out_scales});
      want.push_back({"w_out.zeros", "u8", {H, g_out}, &ExpertRecord::w_out_zeros});
    }
    const json& tensors = v.get(R, "tensors", f + ".tensors", json::value_t::object, "object", li, e);
    if (tensors.contains("b_in")) want.push_back({"b_in", "f32", {rows_in}, &ExpertRecord::b_in});
    if (tensors.contains("b_out")) want.push_back({"b_out", "f32", {H}, &ExpertRecord::b_out});
    {
      std::vector<std::string> have, expect, missing, extra;
      for (auto it = tensors.begin(); it != tensors.end(); ++it) have.push_back(it.key());
      for (const auto& w : want) expect.push_back(w.name);
      std::sort(have.begin(), have.end());
      std::sort(expect.begin(), expect.end());
      std::set_difference(expect.begin(), expect.end(), have.begin(), have.end(), std::back_inserter(missing));
      std::set_difference(have.begin(), have.end(), expect.begin(), expect.end(), std::back_inserter(extra));
      if (!missing.empty() || !extra.empty()) {
        auto join = [](const std::vector<std::string>& xs) {
          std::string s = "[";
          for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + xs[i];
          return s + "]";
        };
        v.fail(f + ".tensors", std::string("tensors for format ") + dtype, join(expect),
               join(have) + " (missing " + join(missing) + ", unexpected " + join(extra) + ")", li, e);
      }
    }
    std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;
    for (const auto& w : want) {
      const std::string tf = f + ".tensors." + w.name;
      const json& t = tensors[w.name];
      if (!t.is_object()) v.fail(tf, "", "a JSON object", dump(t), li, e);
      auto dt = t.find("dtype");
      if (dt == t.end() || !dt->is_string() || dt->get<std::string>() != w.dtype)
        v.fail(tf + ".dtype", "", squote(w.dtype), dt == t.end() ? "nothing" : dump(*dt), li, e);
      const json& shape = v.get(t, "shape", tf + ".shape", json::value_t::array, "list", li, e);
      bool shape_ok = shape.size() == w.shape.size();
      for (size_t d = 0; shape_ok && d < shape.size(); ++d)
        shape_ok = shape[d].is_number_integer() && shape[d].get<int64_t>() == w.shape[d];
      if (!shape_ok) v.fail(tf + ".shape", "shape does not match the layer", shape_str(w.shape), dump(shape), li, e);
      TensorRef ref;
      ref.present = true;
      ref.shape = w.shape;
      ref.offset = static_cast<uint64_t>(v.get_int(t, "offset", tf + ".offset", 0, li, e));
      ref.nbytes = static_cast<uint64_t>(v.get_int(t, "nbytes", tf + ".nbytes", 0, li, e));
      if (ref.offset % 64) v.fail(tf + ".offset", "misaligned tensor", "a multiple of 64", std::to_string(ref.offset), li, e);
      const uint64_t want_nb = tensor_nbytes(w.dtype, w.shape);
      if (ref.nbytes != want_nb)
        v.fail(tf + ".nbytes", "nbytes of " + w.dtype + " " + shape_str(w.shape), std::to_string(want_nb),
               std::to_string(ref.nbytes), li, e);
      if (ref.offset > r.size || ref.nbytes > r.size - ref.offset)
        v.fail(tf + ".offset + nbytes", "tensor outside the blob", "<= size (" + std::to_string(r.size) + ")",
               std::to_string(ref.offset + ref.nbytes), li, e);
      spans.emplace_back(ref.offset, ref.offset + ref.nbytes, w.name);
      r.*(w.slot) = std::move(ref);
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) {
      if (std::get<0>(spans[i]) < std::get<1>(spans[i - 1]))
        v.fail(f + ".tensors." + std::get<2>(spans[i]) + ".offset",
               "tensor " + std::get<2>(spans[i]) + " overlaps tensor " + std::get<2>(spans[i - 1]),
               ">= " + std::to_string(std::get<1>(spans[i - 1])), std::to_string(std::get<0>(spans[i])), li, e);
    }
    parsed.push_back(std::move(r));
  }
  // Every (layer, expert) has a record: the first missing one of the lowest layer is named. The records are
  // unique and in range, so a layer with as many records as experts is complete; finding the gap of an
  // incomplete one looks at most (its records + 1) keys.
  {
    std::vector<int64_t> per_layer(m.layers.size(), 0);
    for (const auto& r : parsed)
      if (r.variant == kPrimary) ++per_layer[static_cast<size_t>(r.layer)];
    for (size_t li = 0; li < m.layers.size(); ++li) {
      if (per_layer[li] == m.layers[li].num_experts) continue;
      int64_t e = 0;
      while (where.count(key_of(static_cast<int64_t>(li), e))) ++e;
      v.fail("experts", "missing expert record", "one record", "none", static_cast<int64_t>(li), e);
    }
  }
  const bool any_twin = std::any_of(parsed.begin(), parsed.end(), [](const ExpertRecord& r) { return r.variant == kTwin; });
  m.experts.resize(m.layers.size());
  if (any_twin) m.twins.resize(m.layers.size());
  m.layer_base_.assign(m.layers.size() + 1, 0);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    m.layer_base_[i + 1] = m.layer_base_[i] + static_cast<size_t>(m.layers[i].num_experts);
    m.experts[i].resize(static_cast<size_t>(m.layers[i].num_experts));
    if (any_twin) m.twins[i].resize(static_cast<size_t>(m.layers[i].num_experts));
  }
  for (size_t n = 0; n < parsed.size(); ++n) {
    ExpertRecord& r = parsed[n];
    const size_t li = static_cast<size_t>(r.layer), e = static_cast<size_t>(r.expert);
    if (r.variant == kTwin) {
      m.twins[li][e] = std::move(r);
      ++m.num_twins_;
    } else {
      m.experts[li][e] = std::move(r);
    }
  }
  // a twin has fewer bits than its primary
  for (size_t li = 0; li < m.twins.size(); ++li) {
    for (size_t e = 0; e < m.twins[li].size(); ++e) {
      const auto& t = m.twins[li][e];
      if (!t) continue;
      const FormatTraits& tp = format_traits(m.experts[li][e].dtype);
      const FormatTraits& tt = format_traits(t->dtype);
      if (tt.bits >= tp.bits)
        v.fail("experts[" + std::to_string(where.at(key_of(static_cast<int64_t>(li), static_cast<int64_t>(e), kTwin))) +
                   "].format.dtype",
               std::string("a twin has fewer bits than its primary: twin ") + tt.name + " (" +
                   std::to_string(tt.bits) + " bits) beside primary " + tp.name + " (" + std::to_string(tp.bits) +
                   " bits)",
               "", "", static_cast<int64_t>(li), static_cast<int64_t>(e));
    }
  }
  // blobs must not overlap
  std::vector<const ExpertRecord*> by_off;
  for (const auto& l : m.experts)
    for (const auto& r : l) by_off.push_back(&r);
  for (const auto& l : m.twins)
    for (const auto& r : l)
      if (r) by_off.push_back(&*r);
  std::sort(by_off.begin(), by_off.end(), [](const ExpertRecord* a, const ExpertRecord* b) {
    return std::tie(a->offset, a->layer, a->expert, a->variant) < std::tie(b->offset, b->layer, b->expert, b->variant);
  });
  for (size_t i = 1; i < by_off.size(); ++i) {
    const ExpertRecord& a = *by_off[i - 1];
    const ExpertRecord& b = *by_off[i];
    if (b.offset < a.offset + a.length)
      v.fail("offset",
             std::string(b.variant == kTwin ? "blob of the twin" : "blob") + " overlaps the blob of layer " +
                 std::to_string(a.layer) + " expert " + std::to_string(a.expert) +
                 (a.variant == kTwin ? " (its twin)" : ""),
             ">= " + std::to_string(a.offset + a.length), std::to_string(b.offset), b.layer, b.expert);
  }
  return m;
}

ExpertView make_expert_view(const ExpertRecord& rec, const uint8_t* blob) {
  auto mat = [&](const TensorRef& w, const TensorRef& s, const TensorRef& z) {
    QMatrix q;
    q.dtype = format_traits(rec.dtype).weight;
    q.rows = w.shape.at(0);
    q.cols = w.shape.at(1);
    q.group_size = rec.group_size;
    q.data = blob + w.offset;
    if (s.present) q.scales = reinterpret_cast<const uint16_t*>(blob + s.offset);
    if (z.present) q.zeros = blob + z.offset;
    return q;
  };
  ExpertView v;
  v.w_in = mat(rec.w_in, rec.w_in_scales, rec.w_in_zeros);
  v.w_out = mat(rec.w_out, rec.w_out_scales, rec.w_out_zeros);
  if (rec.b_in.present) v.w_in.bias = reinterpret_cast<const float*>(blob + rec.b_in.offset);
  if (rec.b_out.present) v.w_out.bias = reinterpret_cast<const float*>(blob + rec.b_out.offset);
  return v;
}

}  // namespace edgemoe
