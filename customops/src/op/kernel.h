// The OffloadedExpert kernel (input checks, then run_moe over ORT's intra-op pool) and its op definition.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "attributes.h"
#include "edgemoe/moe.h"
#include "ort.h"
#include "store_group.h"

namespace edgemoe {

// Inputs of OffloadedExpert (docs/op-contract.md, "Node"): 3 required, then the optional stacked router
// logits of the next layers (opset 2).
constexpr size_t kRequiredInputs = 3;
constexpr size_t kNextLogitsInput = 3;
constexpr size_t kMaxInputs = 4;

// --- kernel ------------------------------------------------------------------------------------------------
struct OffloadedExpertKernel {
  std::shared_ptr<Engine> engine;
  ExpertStore* store = nullptr;
  MoeAttrs attrs;
  int64_t hidden = 0;

  std::string where() const {
    return store->manifest().manifest_path.string() + ": layer " + std::to_string(attrs.layer) + ": node '" +
           attrs.node_name + "'";
  }

  // Input 3 checked against X and the manifest; fills P, E (P = 0 if absent).
  OrtStatusPtr next_logits(Ort::KernelContext& ctx, int64_t T, LayerSignals* sig) const {
    if (ctx.GetInputCount() <= kNextLogitsInput) return nullptr;
    Ort::ConstValue v = ctx.GetInput(kNextLogitsInput);
    if (!v) return nullptr;
    const std::vector<int64_t> s = v.GetTensorTypeAndShapeInfo().GetShape();
    const Manifest& m = store->manifest();
    const int64_t later = static_cast<int64_t>(m.layers.size()) - attrs.layer - 1;
    auto bad = [&](const std::string& expected) {
      return make_status(ORT_INVALID_ARGUMENT,
                         where() + ": next_router_logits shape: expected " + expected + ", found " + shape_str(s));
    };
    if (s.size() < 2) return bad("[T, P, E]");
    int64_t lead = 1;
    for (size_t i = 0; i + 2 < s.size(); ++i) lead *= s[i];
    const int64_t P = s[s.size() - 2], E = s.back();
    if (lead != T) return bad("leading dims holding the " + std::to_string(T) + " tokens of X, then [P, E]");
    if (P < 1 || P > later)
      return bad("P in [1, " + std::to_string(later) + "] (the MoE layers after layer " + std::to_string(attrs.layer) + ")");
    for (int64_t j = 0; j < P; ++j) {
      const int64_t want = m.layers[static_cast<size_t>(attrs.layer + 1 + j)].num_experts;
      if (E != want) return bad("E = " + std::to_string(want) + " (num_experts of layer " + std::to_string(attrs.layer + 1 + j) + ")");
    }
    sig->next_logits = v.GetTensorData<float>();
    sig->P = P;
    sig->E = E;
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    return guarded_compute([this] { return where(); }, false, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() < kRequiredInputs || ctx.GetInputCount() > kMaxInputs || ctx.GetOutputCount() != 1)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 3 or 4 inputs and 1 output, found " +
                                                     std::to_string(ctx.GetInputCount()) + " inputs and " +
                                                     std::to_string(ctx.GetOutputCount()) + " outputs");
      Ort::ConstValue X = ctx.GetInput(0);
      Ort::ConstValue idx = ctx.GetInput(1);
      Ort::ConstValue wts = ctx.GetInput(2);
      const std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> is = idx.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> ws = wts.GetTensorTypeAndShapeInfo().GetShape();
      auto bad = [&](const std::string& field, const std::string& expected, const std::string& found) {
        return make_status(ORT_INVALID_ARGUMENT, where() + ": " + field + ": expected " + expected + ", found " + found);
      };
      if (xs.empty() || xs.back() != hidden)
        return bad("X shape", "[..., " + std::to_string(hidden) + "] (hidden of the layer)", shape_str(xs));
      if (is.size() != xs.size() || !std::equal(xs.begin(), xs.end() - 1, is.begin()))
        return bad("topk_indices shape", "the leading dims of X " + shape_str(xs) + " then K", shape_str(is));
      const int64_t K = is.back();
      if (K != attrs.top_k) return bad("topk_indices last dim (K)", "top_k = " + std::to_string(attrs.top_k), std::to_string(K));
      if (ws != is) return bad("topk_weights shape", "the shape of topk_indices " + shape_str(is), shape_str(ws));
      int64_t T = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) T *= xs[i];
      LayerSignals sig;
      if (OrtStatusPtr st = next_logits(ctx, T, &sig)) return st;
      Ort::UnownedValue Y = ctx.GetOutput(0, xs);
      if (T == 0) return nullptr;
      ParallelFor pf = [&ctx](size_t total, const std::function<void(size_t)>& fn) {
        if (total <= 1) {
          for (size_t i = 0; i < total; ++i) fn(i);
          return;
        }
        ctx.ParallelFor([](void* d, size_t i) { (*static_cast<const std::function<void(size_t)>*>(d))(i); }, total,
                        0, const_cast<void*>(static_cast<const void*>(&fn)));
      };
      const int64_t* ip = idx.GetTensorData<int64_t>();
      std::function<void()> predict;
      if (Prefetcher* pre = engine->prefetcher()) {
        sig.layer = attrs.layer;
        sig.idx = ip;
        sig.T = T;
        sig.K = K;
        predict = [pre, &sig] { pre->on_layer(sig); };
      }
      run_moe(*store, attrs, X.GetTensorData<float>(), ip, wts.GetTensorData<float>(), T, hidden, K,
              Y.GetTensorMutableData<float>(), pf, predict, engine->precision());
      return nullptr;
    });
  }
};

struct OffloadedExpertOp : Ort::CustomOpBase<OffloadedExpertOp, OffloadedExpertKernel, true> {
  explicit OffloadedExpertOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return kMaxInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    return guarded_create(kOpName, node, [&]() -> OrtStatus* {
      NodeAttributes n;
      if (OrtStatus* st = read_attributes(api, info, &n)) return st;
      node = n.node;
      auto kernel = std::make_unique<OffloadedExpertKernel>();
      kernel->engine = group->get(n.manifest);
      kernel->store = &kernel->engine->store();
      if (OrtStatus* st = check_attributes(n, kernel->store->manifest(), &kernel->attrs, &kernel->hidden)) return st;
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    });
  }

  std::shared_ptr<StoreGroup> group;
};

}  // namespace edgemoe
