#include "edgemoe/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <vector>

#include "edgemoe/kernels.h"
#include "edgemoe/moe_plan.h"

namespace edgemoe {

ParallelFor serial_parallel_for() {
  return [](size_t total, const std::function<void(size_t)>& fn) {
    for (size_t i = 0; i < total; ++i) fn(i);
  };
}

namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline float act(Activation a, float x) {
  switch (a) {
    case Activation::Silu: return x * sigmoid(x);
    case Activation::Gelu: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::GeluTanh: {
      const float c = 0.79788456080286536f;  // sqrt(2/pi)
      return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case Activation::Relu: return x > 0.0f ? x : 0.0f;
    case Activation::SwigluOai: return x;  // gated only, handled by the caller
  }
  return x;
}

// Runs `fn` through parallel_for, capturing the first exception instead of letting it cross ORT's pool.
void run_parallel(const ParallelFor& pf, size_t total, const std::function<void(size_t)>& fn) {
  if (total == 0) return;
  std::exception_ptr first;
  std::mutex mu;
  pf(total, [&](size_t i) {
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      if (!first) first = std::current_exception();
    }
  });
  if (first) std::rethrow_exception(first);
}

float* thread_scratch(size_t floats) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < floats) scratch.resize(floats);
  return scratch.data();
}

// Y[0:n, r] for all rows r of W, split in chunks of output rows.
void gemm_parallel(const ParallelFor& pf, const QMatrix& W, const float* X, int64_t n, int64_t ldx, float* Y,
                   int64_t ldy) {
  const int64_t rows = W.rows;
  // Small enough chunks for balance, large enough to amortize the dispatch; ORT batches them per thread.
  const int64_t chunk = std::max<int64_t>(8, std::min<int64_t>(64, rows / 32 / 8 * 8));
  const size_t nchunks = static_cast<size_t>((rows + chunk - 1) / chunk);
  const size_t scratch_floats = gemm_scratch_floats(W);
  run_parallel(pf, nchunks, [&](size_t c) {
    const int64_t r0 = static_cast<int64_t>(c) * chunk;
    const int64_t r1 = std::min(rows, r0 + chunk);
    gemm_rows(W, X, n, ldx, Y, ldy, r0, r1, thread_scratch(std::max<size_t>(scratch_floats, 1)));
  });
}

constexpr int32_t kSkipped = -1;  // a variant value: the expert is not computed this call

struct Workspace {
  MoePlan plan;
  std::vector<int32_t> variant;
  std::vector<float> smin, s, wk;
  FloatScratch z, xg, a, hb;
  void trim() noexcept {
    z.trim();
    xg.trim();
    a.trim();
    hb.trim();
  }
};

}  // namespace

void run_moe(ExpertStore& store, const MoeAttrs& a, const float* X, const int64_t* idx, const float* w,
             int64_t T, int64_t H, int64_t K, float* Y, const ParallelFor& pf,
             const std::function<void()>& after_demands, const PrecisionOptions& precision) {
  const Manifest& m = store.manifest();
  const LayerInfo& lay = m.layers.at(static_cast<size_t>(a.layer));
  const int64_t E = lay.num_experts;
  const int64_t I = lay.intermediate;
  const int64_t rows_in = lay.gated ? 2 * I : I;
  auto where = [&]() {
    return m.manifest_path.string() + ": layer " + std::to_string(a.layer) +
           (a.node_name.empty() ? std::string() : ": node '" + a.node_name + "'");
  };
  // Scratch of this thread, reused by every call (ORT runs one node at a time per calling thread).
  thread_local Workspace ws;
  struct Trim {  // after the call, a prefill-sized scratch is unmapped
    Workspace& w;
    ~Trim() { w.trim(); }
  } trim{ws};
  struct Call {  // brackets the call for the store (steps, layer distances, useless prefetches)
    ExpertStore& s;
    int32_t layer;
    ~Call() { s.end_call(layer); }
  };
  store.begin_call(a.layer);
  Call call{store, a.layer};

  // 1. Group (token, slot) pairs by expert: counting sort, pairs of one expert in (token, slot) order.
  MoePlan& plan = ws.plan;
  plan.build(idx, T, K, E, where);
  // 2. Which copy of each used expert (exact: the primary), then the access order: resident experts first
  //    (they compute while the others are read), then the rest; skipped experts are left out.
  std::vector<int32_t>& variant = ws.variant;  // per expert: kPrimary, kTwin or kSkipped
  variant.assign(static_cast<size_t>(E), kPrimary);
  const bool dynamic = precision.mode == MissPrecision::Dynamic;
  bool any_skip = false;
  if (dynamic) {
    std::vector<float>& smin = ws.smin;  // per expert: the unimportance of its most important use
    std::vector<float>& s = ws.s;
    smin.assign(static_cast<size_t>(E), 2.0f);
    s.resize(static_cast<size_t>(K));
    ws.wk.resize(static_cast<size_t>(K));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) ws.wk[static_cast<size_t>(k)] = idx[t * K + k] >= 0 ? w[t * K + k] : 0.0f;
      unimportance(ws.wk.data(), K, s.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = idx[t * K + k];
        if (e >= 0) smin[static_cast<size_t>(e)] = std::min(smin[static_cast<size_t>(e)], s[static_cast<size_t>(k)]);
      }
    }
    for (int32_t e = 0; e < E; ++e) {
      if (plan.count(e) == 0 || store.is_resident(a.layer, e, kPrimary)) continue;
      const Precision p = precision_for(smin[static_cast<size_t>(e)], precision);
      if (p == Precision::High) continue;  // read the primary (also upgrades over a resident twin)
      const bool twin = m.twin(a.layer, e) != nullptr;
      if (twin && (p == Precision::Low || store.is_resident(a.layer, e, kTwin))) {
        variant[static_cast<size_t>(e)] = kTwin;
      } else if (p == Precision::Skip) {
        variant[static_cast<size_t>(e)] = kSkipped;
        any_skip = true;
      }
    }
  }
  plan.order_by_residency([&](int32_t e) {
    const int32_t v = variant[static_cast<size_t>(e)];
    return v != kSkipped && store.is_resident(a.layer, e, v);
  });
  if (any_skip) plan.drop_from_order([&](int32_t e) { return variant[static_cast<size_t>(e)] == kSkipped; });
  const std::vector<int32_t>& order = plan.order();
  const int64_t P = plan.pairs(), max_n = plan.max_count();

  // 3. Buffers: per pair outputs Z [P, H]; per expert gathered inputs, pre-activation, activation.
  float* Z = ws.z.get(static_cast<size_t>(P * H));
  float* Xg = ws.xg.get(static_cast<size_t>(max_n * H));
  float* A = ws.a.get(static_cast<size_t>(max_n * rows_in));
  float* Hb = ws.hb.get(lay.gated ? static_cast<size_t>(max_n * I) : 0);

  // 4. Read ahead: pins for a prefix of `order` (non-blocking). A blocking acquire happens only for the first
  //    expert without a pin, and then this call holds no other pin (so it can never wait for itself).
  std::vector<std::optional<ExpertStore::Pin>> pins(order.size());
  size_t issued = 0;
  auto issue_ahead = [&] {
    while (issued < order.size()) {
      std::optional<ExpertStore::Pin> p =
          store.try_acquire(a.layer, order[issued], variant[static_cast<size_t>(order[issued])]);
      if (!p) break;
      pins[issued++] = std::move(p);
    }
  };
  bool predicted = !after_demands;
  auto maybe_predict = [&] {
    if (!predicted && issued == order.size()) {
      predicted = true;
      after_demands();
    }
  };
  issue_ahead();
  maybe_predict();

  for (size_t oi = 0; oi < order.size(); ++oi) {
    const int32_t e = order[oi];
    if (oi == issued) {  // not issued ahead: no pins held now
      pins[oi] = store.acquire(a.layer, e, variant[static_cast<size_t>(e)]);
      ++issued;
    }
    issue_ahead();
    maybe_predict();
    const uint8_t* blob = pins[oi]->wait();
    const ExpertView view = make_expert_view(pins[oi]->record(), blob);

    const int64_t p0 = plan.first_pair(e);
    const int64_t n = plan.count(e);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(&Xg[static_cast<size_t>(i * H)], X + plan.pair_token(p0 + i) * H,
                  static_cast<size_t>(H) * sizeof(float));
    }
    gemm_parallel(pf, view.w_in, Xg, n, H, A, rows_in);
    float* h_ptr = A;
    int64_t ldh = rows_in;
    if (lay.gated) {
      run_parallel(pf, static_cast<size_t>(n), [&](size_t i) {
        const float* g = &A[i * static_cast<size_t>(rows_in)];
        const float* u = g + I;
        float* out = &Hb[i * static_cast<size_t>(I)];
        if (a.activation == Activation::SwigluOai) {
          for (int64_t j = 0; j < I; ++j) {
            const float gj = std::min(g[j], a.limit);
            const float uj = std::min(std::max(u[j], -a.limit), a.limit);
            out[j] = (uj + 1.0f) * gj * sigmoid(a.alpha * gj);
          }
        } else {
          for (int64_t j = 0; j < I; ++j) out[j] = act(a.activation, g[j]) * u[j];
        }
      });
      h_ptr = Hb;
      ldh = I;
    } else {
      run_parallel(pf, static_cast<size_t>(n), [&](size_t i) {
        float* row = &A[i * static_cast<size_t>(rows_in)];
        for (int64_t j = 0; j < I; ++j) row[j] = act(a.activation, row[j]);
      });
    }
    gemm_parallel(pf, view.w_out, h_ptr, n, ldh, &Z[static_cast<size_t>(p0 * H)], H);
    pins[oi]->release();
  }

  // 5. Y[t] = sum_k w[t,k] * Z[pair(t,k)], in slot order (deterministic whatever the access order). A token
  //    that lost an expert to a skip has its remaining weights scaled by (sum of all) / (sum of the kept).
  auto skipped = [&](int64_t t, int64_t k) {
    return any_skip && variant[static_cast<size_t>(idx[t * K + k])] == kSkipped;
  };
  const int64_t tchunk = 16;
  run_parallel(pf, static_cast<size_t>((T + tchunk - 1) / tchunk), [&](size_t c) {
    const int64_t t1 = std::min(T, static_cast<int64_t>(c + 1) * tchunk);
    for (int64_t t = static_cast<int64_t>(c) * tchunk; t < t1; ++t) {
      float* y = Y + t * H;
      std::fill(y, y + H, 0.0f);
      float scale = 1.0f;
      bool rescale = false;
      if (any_skip) {
        double all = 0, kept = 0;
        for (int64_t k = 0; k < K; ++k) {
          if (plan.pair_of(t, k) < 0) continue;
          all += w[t * K + k];
          if (!skipped(t, k)) kept += w[t * K + k];
          else rescale = true;
        }
        if (rescale && kept > 0) scale = static_cast<float>(all / kept);
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = plan.pair_of(t, k);
        if (p < 0 || skipped(t, k)) continue;
        const float wk = rescale ? w[t * K + k] * scale : w[t * K + k];
        const float* z = &Z[static_cast<size_t>(p * H)];
        for (int64_t j = 0; j < H; ++j) y[j] += wk * z[j];
      }
    }
  });
  {  // uses by precision
    uint64_t high = 0, low = 0, skip = 0;
    for (int32_t e = 0; e < E; ++e) {
      const uint64_t n = static_cast<uint64_t>(plan.count(e));
      if (!n) continue;
      const int32_t v = variant[static_cast<size_t>(e)];
      (v == kPrimary ? high : v == kTwin ? low : skip) += n;
    }
    CallStats* sink = thread_stats_current(store.options().store_id).get();
    StoreStats& st = *store.stats();
    if (high) st.count(&LayerCounters::uses_high, a.layer, sink, high);
    if (low) st.count(&LayerCounters::uses_low, a.layer, sink, low);
    if (skip) st.count(&LayerCounters::uses_skipped, a.layer, sink, skip);
  }
  store.stats()->calls.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace edgemoe
