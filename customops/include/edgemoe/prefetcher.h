// The predictive prefetcher (docs/op-contract.md, "Prediction and prefetch"): turns what a forward pass has
// seen so far into reads of the experts the next layers will need, issued while the current layer computes.
//
// Predictors (each gives, per token, a probability that an expert is among the target layer's K chosen):
//   table  EdgeMoE: P(E_t | experts the token chose at t-1 and t-2), from the profile, backing off to t-1 alone
//          and then to the expert frequencies;
//   gates  HOBBIT's stacked gates: softmax of the target layer's router applied to the current layer's input
//          (the graph computes it: input 3 of OffloadedExpert);
//   token  P(E_t | token id), from the profile; known at token start (the TokenPrefetch node), so it can read
//          every layer's experts before layer 0 runs;
//   residual the target layer's router applied to the residual stream that leaves the layer before (the graph
//          computes it: the ResidualPrefetch node, docs/op-contract.md), after that layer's experts are known and
//          before the target layer's attention runs: the most accurate signal, half a layer of lead;
//   auto   per target layer, the combination (mean) of the predictors the profile measured best.
// A batch of T tokens needs expert e with q(e) = 1 - prod_t (1 - p_t(e)). Per target layer the up to K
// experts with q >= threshold are prefetched (confidence q, distance in layers). Every expert of a predicted
// layer with q >= 0.02 is protected with its q (and, where no layer before has predicted yet, with the token
// table's q): a prefetch swaps out only an expert of its own layer less likely than itself; demand reads
// evict in the policy's order. The protections are replaced at every call. Adaptive depth (HOBBIT): when at
// least one expert of layer l+1 is predicted above the threshold and every such expert is resident, layer
// l+2 is predicted too, up to `depth`.
//
// State per forward pass is kept per calling thread (ORT runs a session's nodes on the thread that called
// Run), so sessions and threads sharing one store do not mix their histories.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "edgemoe/config.h"
#include "edgemoe/precision.h"
#include "edgemoe/prefetch_cost.h"
#include "edgemoe/profile.h"
#include "edgemoe/store.h"

namespace edgemoe {

// What one OffloadedExpert call offers the predictors.
struct LayerSignals {
  int32_t layer = 0;
  const int64_t* idx = nullptr;  // [T, K] experts chosen at this layer (-1 = none)
  int64_t T = 0, K = 0;
  const float* next_logits = nullptr;  // [T, P, E] stacked router logits of layers layer+1.., or null
  int64_t P = 0, E = 0;
};

class Prefetcher {
 public:
  // `profile` may be empty (then only `gates` can predict). Throws edgemoe::Error if options.predictor needs
  // a profile that is missing.
  // `precision` dynamic: a prefetch reads the copy its predicted unimportance implies (precision.h), the twin
  // or nothing for unimportant ones; s from the stacked gates' predicted gate weights where the call has them
  // (the smallest over its tokens), else from the predicted probabilities of the layer's top K, normalized.
  Prefetcher(ExpertStore& store, const PrefetchOptions& options, std::optional<RoutingProfile> profile,
             const PrecisionOptions& precision = {});
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // A forward pass starts with these tokens (TokenPrefetch node).
  void on_tokens(const int64_t* ids, int64_t n);
  // A layer's experts are known and its demand reads queued: predict and prefetch the next layers.
  void on_layer(const LayerSignals& s);
  // A ResidualPrefetch node for `target` exists in some session of this store (at kernel creation): layers
  // without one are predicted by the stacked gates under edgemoe.predictor = residual.
  void wire_residual(int32_t target);
  bool residual_wired(int32_t target) const;
  // The ResidualPrefetch node of `target` ran: `scores` [T, E] (E = num_experts of target, checked by the
  // node) are the target router's probabilities on the residual stream entering it. Predicts and prefetches
  // `target` (residual, or auto where the profile chose residual: alone, or with members whose mean the call
  // of the layer before computed, and then read nothing for `target`).
  void on_residual(int32_t target, const float* scores, int64_t T, int64_t E);

  bool uses_gates() const { return (modes_ & kPredictGates) != 0; }
  const std::optional<RoutingProfile>& profile() const { return profile_; }
  const PrefetchOptions& options() const { return options_; }

 private:
  struct Stream;
  Stream& stream();
  uint32_t members(int32_t target, int32_t depth, const LayerSignals* s, const Stream& st) const;
  // q over experts of `target` from the predictors in `bits`; false if none could contribute.
  bool predict(int32_t target, int32_t depth, uint32_t bits, const LayerSignals* s, const Stream& st,
               std::vector<float>& q) const;
  struct Read {
    int32_t layer, expert, distance;
    float confidence;
    int32_t variant;
  };
  // Remembers q as the protections of `target` and appends the reads of its selection (the up to K most
  // likely with q >= threshold that are not resident); true if every selected expert was resident.
  // `s_pred` (optional, per expert of `target`): the predicted unimportance from the stacked gates (precision.h),
  // else it is taken from q's ranking.
  // `lead_layers`: the compute until `target` runs, in layers (the cost rule); `batch`: q is of several tokens.
  // A candidate the cost rule declines is counted (prefetch.declined) and not read.
  // `residual`: the prediction is the ResidualPrefetch node's (its own calibration).
  bool select(int32_t target, int32_t distance, double lead_layers, bool batch, bool residual,
              const std::vector<float>& q, Stream& st, std::vector<Read>& reads,
              const std::vector<float>* s_pred = nullptr) const;
  // Dynamic precision with the stacked gates of `target` in `s`: per expert the smallest unimportance over the
  // call's tokens, computed on the predicted gate weights (softmax of the logits, top K, normalized); false
  // if the call has no such logits.
  bool gate_unimportance(int32_t target, int32_t depth, const LayerSignals& s, std::vector<float>& out) const;
  void issue(const std::vector<Read>& reads);
  void remember(int32_t target, int32_t distance, bool batch, bool residual, const std::vector<float>& q,
                Stream& st) const;
  // Feeds the cost model: the interval since the previous layer call and how this layer's predictions did.
  void learn(const LayerSignals& s, Stream& st);
  // What the store should keep for the layers after `after`: each layer's predicted distribution, or the
  // token table's where the layer is not predicted yet.
  std::vector<std::pair<ExpertKey, float>> protections(int32_t after, const Stream& st) const;

  ExpertStore& store_;
  PrefetchOptions options_;
  PrecisionOptions precision_;
  std::optional<RoutingProfile> profile_;
  uint32_t modes_ = 0;  // PredictorBit set allowed by options.predictor
  bool auto_ = false;
  uint64_t id_ = 0;  // key of this prefetcher's per-thread streams
  PrefetchCostModel cost_;  // shared by the threads' streams (it locks)
  std::unique_ptr<std::atomic<bool>[]> residual_wired_;  // per layer: a ResidualPrefetch node targets it
};

}  // namespace edgemoe
