// The ONNX Runtime C++ API as this library uses it (manual init: ORT hands us its API at registration, so
// the library links against no libonnxruntime) and small helpers shared by the op's files.
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <vector>

namespace edgemoe {

constexpr const char* kDomain = "edgemoe";
constexpr const char* kOpName = "OffloadedExpert";

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// `s` with every byte that does not start a well-formed UTF-8 sequence replaced by '?': messages may quote
// bytes from a bundle (a parser's "last read: ..."), and a host decoding them as UTF-8 (Python) must get our
// message, not a decoding error.
inline std::string valid_utf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + len <= n && !(len == 2 && c < 0xC2) && !(len == 4 && c > 0xF4);
    for (size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xC0) == 0x80;
    if (ok && len == 3) {  // no overlong forms, no surrogates
      ok = !(c == 0xE0 && p[i + 1] < 0xA0) && !(c == 0xED && p[i + 1] >= 0xA0);
    } else if (ok && len == 4) {
      ok = !(c == 0xF0 && p[i + 1] < 0x90) && !(c == 0xF4 && p[i + 1] >= 0x90);
    }
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += '?';
      ++i;
    }
  }
  return out;
}

inline OrtStatus* make_status(OrtErrorCode code, const std::string& msg) {
  return Ort::GetApi().CreateStatus(code, valid_utf8(msg).c_str());
}

// Runs an op's ComputeV2 body `f` (returns a status or nullptr): an exception becomes a status that starts with
// `where()` (the node's description, built only on failure); an edgemoe::Error / std::exception message keeps
// its own words, prefixed with where() only if `prefix_errors` (OffloadedExpert's already name file and layer).
template <class Where, class F>
OrtStatus* guarded_compute(Where&& where, bool prefix_errors, F&& f) noexcept {
  try {
    return f();
  } catch (const Ort::Exception& ex) {
    return make_status(ex.GetOrtErrorCode(), where() + ": " + ex.what());
  } catch (const std::bad_alloc&) {
    return make_status(ORT_FAIL, where() + ": out of memory");
  } catch (const std::exception& ex) {
    return make_status(ORT_FAIL, prefix_errors ? where() + ": " + ex.what() : std::string(ex.what()));
  } catch (...) {
    return make_status(ORT_FAIL, where() + ": unknown error");
  }
}

// Runs an op's CreateKernelV2 body `f` (returns a status or nullptr): an exception becomes a status naming the
// op and `node` (which `f` may fill in once it knows it), so none crosses the C boundary.
template <class F>
OrtStatus* guarded_create(const char* op, const std::string& node, F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return make_status(ORT_FAIL, std::string(op) + " node '" + node + "': out of memory");
  } catch (const std::exception& ex) {
    return make_status(ORT_FAIL, ex.what());
  } catch (...) {
    return make_status(ORT_FAIL, std::string(op) + " node '" + node + "': unknown error");
  }
}

}  // namespace edgemoe
