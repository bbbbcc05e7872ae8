#include "edgemoe/formats.h"

namespace edgemoe {

const std::vector<FormatTraits>& formats() {
  static const std::vector<FormatTraits> table = {
      {ExpertDType::FP32, "fp32", "f32", WDType::F32, 32, false, "none"},
      {ExpertDType::FP16, "fp16", "f16", WDType::F16, 16, false, "none"},
      {ExpertDType::INT8, "int8", "u8", WDType::U8, 8, true, "asym_u"},
      {ExpertDType::INT4, "int4", "u4", WDType::U4, 4, true, "asym_u"},
  };
  return table;
}

const FormatTraits& format_traits(ExpertDType d) {
  for (const auto& f : formats())
    if (f.dtype == d) return f;
  return formats().front();  // unreachable: every enumerator has a row
}

const FormatTraits* find_format(const std::string& name) {
  for (const auto& f : formats())
    if (name == f.name) return &f;
  return nullptr;
}

std::string format_names() {
  std::string s;
  for (const auto& f : formats()) s += (s.empty() ? "" : ", ") + std::string(f.name);
  return s;
}

const char* expert_dtype_name(ExpertDType d) { return format_traits(d).name; }

uint64_t tensor_nbytes(const std::string& dtype, const std::vector<int64_t>& shape) {
  if (dtype == "u4") return static_cast<uint64_t>(shape.at(0)) * static_cast<uint64_t>((shape.at(1) + 1) / 2);
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  if (dtype == "f32") return n * 4;
  if (dtype == "f16") return n * 2;
  return n;  // u8
}

}  // namespace edgemoe
