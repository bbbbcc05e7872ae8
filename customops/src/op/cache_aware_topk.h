// The CacheAwareTopK op (docs/op-contract.md, "CacheAwareTopK"): the top-k step of one MoE layer's router,
// wired in place of its TopK (or ArgMax + ReduceMax for top-1 routers), choosing with the layer's expert cache
// in view under the session's routing rule (edgemoe/routing.h). With edgemoe.routing = exact it is ONNX TopK
// (largest, sorted, last axis) bit for bit.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "attributes.h"
#include "edgemoe/routing.h"
#include "edgemoe/stats.h"
#include "ort.h"
#include "store_group.h"

namespace edgemoe {

constexpr const char* kCacheAwareTopKName = "CacheAwareTopK";

struct CacheAwareTopKKernel {
  std::shared_ptr<Engine> engine;
  std::string node;
  int32_t layer = 0;
  int64_t num_experts = 0, top_k = 0;
  ScoreKind kind = ScoreKind::Probs;

  std::string where() const {
    return engine->store().manifest().manifest_path.string() + ": layer " + std::to_string(layer) + ": " +
           kCacheAwareTopKName + " node '" + node + "'";
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return guarded_compute([this] { return where(); }, true, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() != 2 || ctx.GetOutputCount() != 2)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 2 inputs (X, K) and 2 outputs (Values, Indices)");
      Ort::ConstValue X = ctx.GetInput(0);
      Ort::ConstValue Kt = ctx.GetInput(1);
      std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> ks = Kt.GetTensorTypeAndShapeInfo().GetShape();
      auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
        return make_status(ORT_INVALID_ARGUMENT, where() + ": " + field + ": expected " + expected + ", found " + found);
      };
      if (xs.empty() || xs.back() != num_experts)
        return bad("X shape", "[..., " + std::to_string(num_experts) + "] (num_experts of the layer)", shape_str(xs));
      if (Kt.GetTensorTypeAndShapeInfo().GetElementCount() != 1) return bad("K shape", "[1]", shape_str(ks));
      const int64_t k = Kt.GetTensorData<int64_t>()[0];
      if (k != top_k) return bad("K", std::to_string(top_k) + " (top_k of the layer)", std::to_string(k));
      int64_t T = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) T *= xs[i];
      xs.back() = k;
      Ort::UnownedValue values = ctx.GetOutput(0, xs);
      Ort::UnownedValue indices = ctx.GetOutput(1, xs);
      if (T == 0) return nullptr;
      CacheAwareRouter& router = engine->router();
      ExpertStore& store = engine->store();
      std::vector<uint8_t> resident;  // per call: sessions may run concurrently on one kernel
      const uint8_t* mask = nullptr;
      if (router.biased() && store.cache_enabled()) {
        resident.resize(static_cast<size_t>(num_experts));
        store.residency(layer, resident.data(), static_cast<int32_t>(num_experts));
        mask = resident.data();
      }
      RouteCounts counts;
      router.route(layer, kind, X.GetTensorData<float>(), T, num_experts, k, mask,
                   values.GetTensorMutableData<float>(), indices.GetTensorMutableData<int64_t>(), &counts);
      StoreStats& stats = *store.stats();
      CallStats* sink = thread_stats_current(store.options().store_id).get();
      stats.count(&LayerCounters::route_selections, layer, sink, counts.selections);
      if (counts.changed) stats.count(&LayerCounters::route_changed, layer, sink, counts.changed);
      if (counts.misses_avoided) stats.count(&LayerCounters::route_misses_avoided, layer, sink, counts.misses_avoided);
      return nullptr;
    });
  }
};

struct CacheAwareTopKOp : Ort::CustomOpBase<CacheAwareTopKOp, CacheAwareTopKKernel, true> {
  explicit CacheAwareTopKOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kCacheAwareTopKName; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }

  // Attributes (read and checked against the manifest here, apart from Compute): layer (required),
  // scores = "probs" | "logits" (required), manifest (default manifest.json).
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    return guarded_create(kCacheAwareTopKName, node, [&]() -> OrtStatus* {
      node = Ort::ConstKernelInfo(info).GetNodeName();
      const std::string who = std::string(kCacheAwareTopKName) + " node '" + node + "'";
      std::string scores, manifest = "manifest.json";
      if (!attr_string(api, info, "scores", &scores))
        return make_status(ORT_INVALID_ARGUMENT, who + ": missing string attribute 'scores' (probs or logits)");
      if (scores != "probs" && scores != "logits")
        return make_status(ORT_INVALID_ARGUMENT, who + ": attribute scores: expected probs or logits, found '" + scores + "'");
      attr_string(api, info, "manifest", &manifest);
      auto kernel = std::make_unique<CacheAwareTopKKernel>();
      kernel->engine = group->get(manifest);
      kernel->node = node;
      const Manifest& m = kernel->engine->store().manifest();
      if (OrtStatus* st = read_layer_attribute(api, info, who, m, &kernel->layer)) return st;
      kernel->num_experts = m.layers[static_cast<size_t>(kernel->layer)].num_experts;
      kernel->top_k = m.layers[static_cast<size_t>(kernel->layer)].top_k;
      kernel->kind = scores == "probs" ? ScoreKind::Probs : ScoreKind::Logits;
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    });
  }

  std::shared_ptr<StoreGroup> group;
};

}  // namespace edgemoe
