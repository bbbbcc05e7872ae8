// The TokenPrefetch op (docs/op-contract.md, "TokenPrefetch"): the identity on the graph's token ids,
// wired before the embedding so that it runs first; it hands the ids to the engine's prefetcher, which reads
// the experts the token table predicts for every layer before layer 0 runs.
#pragma once
#include <cstring>
#include <memory>
#include <string>

#include "attributes.h"
#include "ort.h"
#include "store_group.h"

namespace edgemoe {

constexpr const char* kTokenPrefetchName = "TokenPrefetch";

struct TokenPrefetchKernel {
  std::shared_ptr<Engine> engine;
  std::string node;

  std::string where() const { return std::string(kTokenPrefetchName) + " node '" + node + "'"; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return guarded_compute([this] { return where(); }, true, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() != 1 || ctx.GetOutputCount() != 1)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 1 input and 1 output");
      Ort::ConstValue ids = ctx.GetInput(0);
      const auto info = ids.GetTensorTypeAndShapeInfo();
      const size_t n = info.GetElementCount();
      Ort::UnownedValue out = ctx.GetOutput(0, info.GetShape());
      const int64_t* src = ids.GetTensorData<int64_t>();
      if (n) std::memcpy(out.GetTensorMutableData<int64_t>(), src, n * sizeof(int64_t));
      if (Prefetcher* p = engine->prefetcher()) p->on_tokens(src, static_cast<int64_t>(n));
      return nullptr;
    });
  }
};

struct TokenPrefetchOp : Ort::CustomOpBase<TokenPrefetchOp, TokenPrefetchKernel, true> {
  explicit TokenPrefetchOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kTokenPrefetchName; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    return guarded_create(kTokenPrefetchName, node, [&]() -> OrtStatus* {
      node = Ort::ConstKernelInfo(info).GetNodeName();
      std::string manifest = "manifest.json";
      attr_string(api, info, "manifest", &manifest);
      auto kernel = std::make_unique<TokenPrefetchKernel>();
      kernel->engine = group->get(manifest);
      kernel->node = node;
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    });
  }

  std::shared_ptr<StoreGroup> group;
};

}  // namespace edgemoe
