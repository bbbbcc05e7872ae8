// The ResidualPrefetch op (docs/op-contract.md, "ResidualPrefetch"): the identity on the residual stream `h`
// that enters MoE layer `layer` (the one leaving the layer before), wired between `h` and all its consumers so
// that it runs before the layer's attention; its second input, `scores`, is the layer's router (softmax)
// applied to `h` through a clone of the router's normalization. It hands the scores to the engine's
// prefetcher, which reads the layer's likely experts while its attention runs.
#pragma once
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attributes.h"
#include "ort.h"
#include "store_group.h"

namespace edgemoe {

constexpr const char* kResidualPrefetchName = "ResidualPrefetch";

struct ResidualPrefetchKernel {
  std::shared_ptr<Engine> engine;
  std::string node;
  int32_t layer = 0;
  int64_t hidden = 0, num_experts = 0;

  std::string where() const {
    return engine->store().manifest().manifest_path.string() + ": layer " + std::to_string(layer) + ": " +
           kResidualPrefetchName + " node '" + node + "'";
  }

  // Shapes of h [..., H] and scores [..., E] with the same token count; T out.
  OrtStatusPtr check_inputs(const std::vector<int64_t>& hs, const std::vector<int64_t>& ss, int64_t* T) const {
    auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
      return make_status(ORT_INVALID_ARGUMENT, where() + ": " + field + ": expected " + expected + ", found " + found);
    };
    if (hs.empty() || hs.back() != hidden)
      return bad("h shape", "[..., " + std::to_string(hidden) + "] (hidden of the layer)", shape_str(hs));
    if (ss.empty() || ss.back() != num_experts)
      return bad("scores shape", "[..., " + std::to_string(num_experts) + "] (num_experts of the layer)", shape_str(ss));
    int64_t th = 1, ts = 1;
    for (size_t i = 0; i + 1 < hs.size(); ++i) th *= hs[i];
    for (size_t i = 0; i + 1 < ss.size(); ++i) ts *= ss[i];
    if (th != ts)
      return bad("scores shape", "leading dims holding the " + std::to_string(th) + " tokens of h " + shape_str(hs),
                 shape_str(ss));
    *T = th;
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return guarded_compute([this] { return where(); }, true, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() != 2 || ctx.GetOutputCount() != 1)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 2 inputs (h, scores) and 1 output");
      Ort::ConstValue h = ctx.GetInput(0);
      Ort::ConstValue scores = ctx.GetInput(1);
      const std::vector<int64_t> hs = h.GetTensorTypeAndShapeInfo().GetShape();
      int64_t T = 0;
      if (OrtStatusPtr st = check_inputs(hs, scores.GetTensorTypeAndShapeInfo().GetShape(), &T)) return st;
      Ort::UnownedValue out = ctx.GetOutput(0, hs);
      if (T == 0) return nullptr;
      // the prefetch first: its reads then overlap the copy and everything after
      if (Prefetcher* p = engine->prefetcher()) p->on_residual(layer, scores.GetTensorData<float>(), T, num_experts);
      std::memcpy(out.GetTensorMutableData<float>(), h.GetTensorData<float>(),
                  static_cast<size_t>(T * hidden) * sizeof(float));
      return nullptr;
    });
  }
};

struct ResidualPrefetchOp : Ort::CustomOpBase<ResidualPrefetchOp, ResidualPrefetchKernel, true> {
  explicit ResidualPrefetchOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kResidualPrefetchName; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  // Attributes (read and checked against the manifest here, apart from Compute): layer (required: the MoE
  // layer the scores are of, a manifest index), manifest (default manifest.json).
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    return guarded_create(kResidualPrefetchName, node, [&]() -> OrtStatus* {
      node = Ort::ConstKernelInfo(info).GetNodeName();
      const std::string who = std::string(kResidualPrefetchName) + " node '" + node + "'";
      std::string manifest = "manifest.json";
      attr_string(api, info, "manifest", &manifest);
      auto kernel = std::make_unique<ResidualPrefetchKernel>();
      kernel->engine = group->get(manifest);
      kernel->node = node;
      const Manifest& m = kernel->engine->store().manifest();
      if (OrtStatus* st = read_layer_attribute(api, info, who, m, &kernel->layer)) return st;
      kernel->hidden = m.layers[static_cast<size_t>(kernel->layer)].hidden;
      kernel->num_experts = m.layers[static_cast<size_t>(kernel->layer)].num_experts;
      if (Prefetcher* p = kernel->engine->prefetcher()) p->wire_residual(kernel->layer);
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    });
  }

  std::shared_ptr<StoreGroup> group;
};

}  // namespace edgemoe
