// The one table of expert formats (docs/bundle-format.md, "Quantization formats"). The manifest reader, the
// expert views and the kernels' dispatch all draw on it: a format is added here, once.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "edgemoe/kernels.h"

namespace edgemoe {

enum class ExpertDType : uint8_t { FP32, FP16, INT8, INT4 };

struct FormatTraits {
  ExpertDType dtype;
  const char* name;          // manifest `format.dtype`: "int4"
  const char* tensor_dtype;  // dtype of the weight tensors in the manifest: "u4"
  WDType weight;             // kernel weight type
  int bits;                  // bits per weight
  bool grouped;              // group-wise asymmetric: `.scales` (f16) and `.zeros` (u8) per (row, group)
  const char* scheme;        // manifest `format.scheme`: "asym_u" or "none"
};

// Every format, in manifest order (fp32, fp16, int8, int4).
const std::vector<FormatTraits>& formats();
const FormatTraits& format_traits(ExpertDType d);
// The format named `name` (manifest `format.dtype`), or nullptr.
const FormatTraits* find_format(const std::string& name);
// "fp32, fp16, int8, int4" (for error messages).
std::string format_names();
const char* expert_dtype_name(ExpertDType d);

// Bytes of a tensor of manifest dtype `tensor_dtype` ("f32", "f16", "u8", "u4") and shape [rows, cols] (or
// [n]); u4 packs two weights per byte along a row (odd widths padded).
uint64_t tensor_nbytes(const std::string& tensor_dtype, const std::vector<int64_t>& shape);

}  // namespace edgemoe
