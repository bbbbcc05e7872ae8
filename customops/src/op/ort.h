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

inline OrtStatus* make_status(OrtErrorCode code, const std::string& msg) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
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
