// The ONNX Runtime C++ API as this library uses it (manual init: ORT hands us its API at registration, so
// the library links against no libonnxruntime) and small helpers shared by the op's files.
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

namespace edgemoe {

constexpr const char* kDomain = "edgemoe";
constexpr const char* kOpName = "OffloadedExpert";

inline OrtStatus* make_status(OrtErrorCode code, const std::string& msg) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
}

}  // namespace edgemoe
