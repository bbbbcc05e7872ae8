// The one table of expert formats (docs/bundle-format.md, "Quantization formats"). The manifest reader, the
// expert views and the kernels' dispatch all draw on it: a format is added here, once.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "edgemoe/kernels.h"

namespace edgemoe {

enum class ExpertDType : uint8_t { FP32, FP16, INT8, INT4, INT3, INT2 };

struct FormatTraits {
  ExpertDType dtype;
  const char* name;          // manifest `format.dtype`: "int4"
  const char* tensor_dtype;  // dtype of the weight tensors in the manifest: "u4"
  WDType weight;             // kernel weight type
  int bits;                  // bits per weight; < 8: packed (docs/bundle-format.md, "Packing")
  bool grouped;              // group-wise asymmetric: `.scales` (f16) and `.zeros` (u8) per (row, group)
  const char* scheme;        // manifest `format.scheme`: "asym_u" or "none"
};

// Every format, in manifest order (fp32, fp16, int8, int4, int3, int2).
const std::vector<FormatTraits>& formats();
const FormatTraits& format_traits(ExpertDType d);
// The format named `name` (manifest `format.dtype`), or nullptr.
const FormatTraits* find_format(const std::string& name);
// "fp32, fp16, int8, int4, int3, int2" (for error messages).
std::string format_names();
const char* expert_dtype_name(ExpertDType d);

// Bits per element of manifest tensor dtype `tensor_dtype` ("f32" 32, "f16" 16, "u8" 8, "u4" 4, "u3" 3,
// "u2" 2: the `bits` of the format whose weight tensors have that dtype), or 0 if there is none.
int tensor_dtype_bits(const std::string& tensor_dtype);
// Bytes of a tensor of manifest dtype `tensor_dtype` and shape [rows, cols] (or [n]): rows * ceil(bits * cols
// / 8). Packed dtypes (bits < 8) are 2-D, every row a little-endian bit stream starting on a byte.
// Throws std::invalid_argument for an unknown dtype or a packed tensor that is not 2-D.
uint64_t tensor_nbytes(const std::string& tensor_dtype, const std::vector<int64_t>& shape);

}  // namespace edgemoe
