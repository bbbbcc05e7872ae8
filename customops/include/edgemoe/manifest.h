// Bundle manifest reader + validator (docs/bundle-format.md, "Validation").
// Every failure throws edgemoe::Error whose message names the file, `layer L expert E`, the field and the
// expected vs found values, in the format of the Python reader (edgemoe_ort/bundle/errors.py):
//   <file>: layer L expert E: <field>: <message> (expected X, found Y)
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <nlohmann/json_fwd.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "edgemoe/formats.h"
#include "edgemoe/kernels.h"

namespace edgemoe {

// All errors of the library (manifest, store, op inputs). The message is complete and user-facing.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Limits of the readers (docs/reliability.md). Bundles within them are never refused for their size. The
// Python reader (edgemoe_ort/bundle/format.py READER_LIMITS) applies the same values: reader_limits() lists
// them, the C API hands that list to Python (edgemoe_reader_limits_json) and a test checks the two agree.
constexpr uint64_t kMaxManifestBytes = uint64_t{128} << 20;  // manifest.json (~130k expert records)
constexpr size_t kMaxJsonDepth = 64;                          // nested lists/objects in a JSON file we read
constexpr size_t kMaxPathBytes = 4096;                        // a relative path in a bundle (PATH_MAX)
constexpr size_t kMaxMessagePart = 512;                       // each part of an error_message (clipped)
constexpr int64_t kMaxExperts = int64_t{1} << 20;             // num_experts of a layer
constexpr int64_t kMaxDim = int64_t{1} << 24;                 // hidden, intermediate, group_size

struct ReaderLimit {
  const char* name;  // the key both readers' tables use
  uint64_t value;
  const char* doc;
};
// The limits above as one table (name, value, meaning), in a fixed order.
const std::vector<ReaderLimit>& reader_limits();

// `s` cut to at most max_chars characters ("..." at the end if it was cut).
std::string clip(const std::string& s, size_t max_chars);

// Builds "<file>: layer L expert E: <field>: <message> (expected X, found Y)"; parts that are empty or
// negative (layer/expert < 0) are left out; each part is clipped to kMaxMessagePart characters (the file
// name to kMaxPathBytes + 256), so a message stays a few KiB whatever the bundle holds.
std::string error_message(const std::string& file, int64_t layer, int64_t expert, const std::string& field,
                          const std::string& message, const std::string& expected = {},
                          const std::string& found = {});

enum class Activation : uint8_t { Silu, Gelu, GeluTanh, Relu, SwigluOai };
// Throws edgemoe::Error (listing the known names) for an unknown name.
Activation parse_activation(const std::string& name);
const char* activation_name(Activation a);


// One tensor of a blob. `offset` is relative to the blob start; present == false for absent optional ones.
struct TensorRef {
  bool present = false;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  std::vector<int64_t> shape;
};

// Record `variant` (format version 2): the primary copy of an expert, or its low-bit twin (HOBBIT).
constexpr int32_t kPrimary = 0;
constexpr int32_t kTwin = 1;

struct ExpertRecord {
  int32_t layer = 0;
  int32_t expert = 0;
  int32_t variant = kPrimary;
  uint64_t offset = 0;  // in the store, multiple of alignment
  uint64_t length = 0;  // bytes read (multiple of alignment); also the bytes a resident copy occupies
  uint64_t size = 0;    // meaningful bytes; the checksum covers [0, size)
  uint64_t checksum = 0;
  std::string checksum_hex;
  ExpertDType dtype = ExpertDType::FP32;
  int64_t group_size = 0;
  TensorRef w_in, w_out, w_in_scales, w_in_zeros, w_out_scales, w_out_zeros, b_in, b_out;
};

struct LayerInfo {
  int32_t layer = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  bool gated = true;
  Activation activation = Activation::Silu;
};

struct Manifest {
  std::filesystem::path bundle_dir;     // absolute
  std::filesystem::path manifest_path;  // absolute
  std::filesystem::path store_path;     // absolute
  uint64_t store_size = 0;
  uint64_t alignment = 0;
  int format_version = 1;
  std::vector<LayerInfo> layers;
  std::vector<std::vector<ExpertRecord>> experts;                // [layer][expert]: the primaries
  std::vector<std::vector<std::optional<ExpertRecord>>> twins;   // [layer][expert]; empty without twins

  // The record of (layer, expert, variant); throws edgemoe::Error if absent (a twin the bundle lacks too).
  const ExpertRecord& record(int64_t layer, int64_t expert, int32_t variant = kPrimary) const;
  // The twin of (layer, expert), or nullptr.
  const ExpertRecord* twin(int64_t layer, int64_t expert) const;
  bool has_twins() const { return num_twins_ > 0; }
  // The largest `length` of any record (primary or twin).
  uint64_t largest_length() const;
  // Bytes of the primaries' blobs (sum of `length`): what a budget in percent is a share of in a bundle with
  // twins (without, the engine takes store.size).
  uint64_t primary_bytes() const;
  // Number of (layer, expert) pairs: the primaries.
  size_t num_experts() const;
  // Dense index of (layer, expert, variant) in [0, num_records()): primaries first, then (if the bundle has
  // twins) one slot per expert for its twin.
  size_t num_records() const;
  size_t record_index(int64_t layer, int64_t expert, int32_t variant = kPrimary) const;

 private:
  friend Manifest load_manifest(const std::filesystem::path&, const std::string&);
  std::vector<size_t> layer_base_;
  size_t num_twins_ = 0;
};

// Checks that `rel` is a bundle-relative path: non-empty, at most kMaxPathBytes, POSIX (no backslash or
// NUL), not absolute, and every '/'-separated component non-empty and neither '.' nor '..' (so
// `experts.bin/.`, `a//b` and a trailing '/' are refused: one spelling per file). Returns the reason it is
// not, or an empty string. Where the path leads after symlinks are resolved is checked by load_manifest.
std::string check_relative_path(const std::string& rel);

// Checks that the JSON text `text` nests lists/objects at most max_depth deep (brackets outside strings,
// before parsing: values nested deeper are what recursive code such as nlohmann's dump() overflows the
// stack on). Returns the reason it does not, or an empty string.
std::string check_json_nesting(const std::string& text, size_t max_depth = kMaxJsonDepth);

// A bounded, non-recursive rendering of a JSON value for error messages: at most max_chars characters of
// its JSON text ("..." if cut), whatever its size or depth. Never call dump() on a value read from a file.
std::string json_summary(const nlohmann::json& v, size_t max_chars = 80);

// Reads and validates `<bundle_dir>/<manifest_rel>`, including `store.size` against the actual file size.
Manifest load_manifest(const std::filesystem::path& bundle_dir, const std::string& manifest_rel = "manifest.json");

// Views of an expert's matrices inside a blob that holds `rec` (blob = the first byte of the record).
struct ExpertView {
  QMatrix w_in;
  QMatrix w_out;
};
ExpertView make_expert_view(const ExpertRecord& rec, const uint8_t* blob);

}  // namespace edgemoe
