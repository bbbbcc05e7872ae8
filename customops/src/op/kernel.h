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

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// --- kernel ------------------------------------------------------------------------------------------------
struct OffloadedExpertKernel {
  std::shared_ptr<ExpertStore> store;
  MoeAttrs attrs;
  int64_t hidden = 0;

  std::string where() const {
    return store->manifest().manifest_path.string() + ": layer " + std::to_string(attrs.layer) + ": node '" +
           attrs.node_name + "'";
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      Ort::KernelContext ctx(context);
      if (ctx.GetInputCount() != 3 || ctx.GetOutputCount() != 1)
        return make_status(ORT_INVALID_ARGUMENT, where() + ": expected 3 inputs and 1 output");
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
      run_moe(*store, attrs, X.GetTensorData<float>(), idx.GetTensorData<int64_t>(), wts.GetTensorData<float>(), T,
              hidden, K, Y.GetTensorMutableData<float>(), pf);
      return nullptr;
    } catch (const Ort::Exception& ex) {
      return make_status(ex.GetOrtErrorCode(), where() + ": " + ex.what());
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, where() + ": out of memory");
    } catch (const std::exception& ex) {
      return make_status(ORT_FAIL, ex.what());
    } catch (...) {
      return make_status(ORT_FAIL, where() + ": unknown error");
    }
  }
};

struct OffloadedExpertOp : Ort::CustomOpBase<OffloadedExpertOp, OffloadedExpertKernel, true> {
  explicit OffloadedExpertOp(std::shared_ptr<StoreGroup> g) : group(std::move(g)) {}

  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const noexcept {
    std::string node = "?";
    try {
      NodeAttributes n;
      if (OrtStatus* st = read_attributes(api, info, &n)) return st;
      node = n.node;
      auto kernel = std::make_unique<OffloadedExpertKernel>();
      kernel->store = group->get(n.manifest);
      if (OrtStatus* st = check_attributes(n, kernel->store->manifest(), &kernel->attrs, &kernel->hidden)) return st;
      *op_kernel = kernel.release();  // owned by ORT, freed through KernelDestroy
      return nullptr;
    } catch (const std::bad_alloc&) {
      return make_status(ORT_FAIL, std::string(kOpName) + " node '" + node + "': out of memory");
    } catch (const std::exception& ex) {
      return make_status(ORT_FAIL, ex.what());
    } catch (...) {
      return make_status(ORT_FAIL, std::string(kOpName) + " node '" + node + "': unknown error");
    }
  }

  std::shared_ptr<StoreGroup> group;
};

}  // namespace edgemoe
