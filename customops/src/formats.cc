#include "edgemoe/formats.h"

#include <stdexcept>

namespace edgemoe {

const std::vector<FormatTraits>& formats() {
  static const std::vector<FormatTraits> table = {
      {ExpertDType::FP32, "fp32", "f32", WDType::F32, 32, false, "none"},
      {ExpertDType::FP16, "fp16", "f16", WDType::F16, 16, false, "none"},
      {ExpertDType::INT8, "int8", "u8", WDType::U8, 8, true, "asym_u"},
      {ExpertDType::INT4, "int4", "u4", WDType::U4, 4, true, "asym_u"},
      {ExpertDType::INT3, "int3", "u3", WDType::U3, 3, true, "asym_u"},
      {ExpertDType::INT2, "int2", "u2", WDType::U2, 2, true, "asym_u"},
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

int tensor_dtype_bits(const std::string& tensor_dtype) {
  for (const auto& f : formats())
    if (tensor_dtype == f.tensor_dtype) return f.bits;
  return 0;
}

uint64_t tensor_nbytes(const std::string& dtype, const std::vector<int64_t>& shape) {
  const int bits = tensor_dtype_bits(dtype);
  if (bits == 0) throw std::invalid_argument("tensor_nbytes: unknown tensor dtype '" + dtype + "'");
  if (bits < 8 && shape.size() != 2)
    throw std::invalid_argument("tensor_nbytes: " + dtype + " tensors must be 2-D");
  // Any other rank is one row of all its elements (bits >= 8 there, so the product is exact).
  uint64_t rows = 1, cols = 1;
  if (shape.size() == 2) {
    rows = static_cast<uint64_t>(shape[0]);
    cols = static_cast<uint64_t>(shape[1]);
  } else {
    for (int64_t d : shape) cols *= static_cast<uint64_t>(d);
  }
  return rows * ((static_cast<uint64_t>(bits) * cols + 7) / 8);
}

}  // namespace edgemoe
