#include "edgemoe/prefetcher.h"

#include <algorithm>
#include <atomic>
#include <bitset>
#include <chrono>
#include <cmath>
#include <memory>
#include <unordered_map>

namespace edgemoe {

namespace {
std::atomic<uint64_t> next_prefetcher_id{1};
// Predicted probabilities below this are left out of the protections (the store counts a left-out expert of
// a predicted layer as 0): with many experts per layer the list stays short.
constexpr float kMinProtection = 0.02f;

// The sorted experts of token t of a [T, K] index tensor (-1 entries dropped).
std::vector<int32_t> token_set(const int64_t* idx, int64_t t, int64_t K) {
  std::vector<int32_t> s;
  for (int64_t k = 0; k < K; ++k)
    if (idx[t * K + k] >= 0) s.push_back(static_cast<int32_t>(idx[t * K + k]));
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

// Multiplies (1 - p) into keep[e] for a sparse distribution (unlisted experts: p = 0).
void absorb(const SparseDist& d, std::vector<double>& keep) {
  for (const auto& [e, p] : d)
    if (static_cast<size_t>(e) < keep.size()) keep[static_cast<size_t>(e)] *= 1.0 - static_cast<double>(p);
}
void absorb(const std::vector<float>& p, std::vector<double>& keep) {
  for (size_t e = 0; e < keep.size() && e < p.size(); ++e) keep[e] *= 1.0 - static_cast<double>(p[e]);
}
}  // namespace

struct Prefetcher::Stream {
  int32_t last_layer = -1;
  // The previous call of this pass: its layer and the per-token expert sets.
  int32_t prev_layer = -1;
  std::vector<std::vector<int32_t>> prev_sets;
  // token predictor: per layer the batch distribution q (empty = no token signal this pass)
  std::vector<std::vector<float>> token_q;
  // What this pass predicted and has not run yet: per layer (expert, q as predicted), how many layers ahead
  // (0: at token start) and whether for a batch of tokens.
  std::vector<std::vector<std::pair<int32_t, float>>> predicted;
  std::vector<int32_t> predicted_distance;
  std::vector<uint8_t> predicted_batch;
  std::vector<uint8_t> predicted_residual;  // by the ResidualPrefetch node (its own calibration)
  // auto: what the layer before predicted for each layer (q and its PredictorBit set), for the residual
  // node to combine with where the profile chose residual with other members.
  std::vector<std::vector<float>> early_q;
  std::vector<uint32_t> early_bits;
  // The previous layer call of this pass (prev_layer): when it started, and the thread's stall and the
  // device's busy time then (the cost model's intervals).
  uint64_t prev_ns = 0, prev_stall_ns = 0, prev_busy_ns = 0;
  // Hits at the start of the last single-token pass (kept across passes: the reuse rate rho).
  uint64_t pass_hits = 0;
  bool have_pass = false;

  void reset(size_t L) {
    last_layer = -1;
    prev_layer = -1;
    prev_sets.clear();
    token_q.assign(L, {});
    predicted.assign(L, {});
    predicted_distance.assign(L, 0);
    predicted_batch.assign(L, 0);
    predicted_residual.assign(L, 0);
    early_q.assign(L, {});
    early_bits.assign(L, 0);
    prev_ns = 0;
  }
};

Prefetcher::Prefetcher(ExpertStore& store, const PrefetchOptions& options, std::optional<RoutingProfile> profile,
                       const PrecisionOptions& precision)
    : store_(store),
      options_(options),
      precision_(precision),
      profile_(std::move(profile)),
      id_(next_prefetcher_id.fetch_add(1)),
      cost_(std::max<int32_t>(1, options.depth)),
      residual_wired_(std::make_unique<std::atomic<bool>[]>(store.manifest().layers.size())) {
  const std::string& p = options_.predictor;
  if (p == "auto") {
    auto_ = true;
    modes_ = kPredictGates | (profile_ ? (kPredictTable | kPredictToken | kPredictResidual) : 0u);
  } else if (p == "none") {
    modes_ = 0;
  } else {
    modes_ = predictor_bit(p);
    if (!modes_) throw Error("edgemoe.predictor: expected " + predictor_list("none", "auto") + ", found '" + p + "'");
    if ((modes_ & (kPredictTable | kPredictToken)) && !profile_)
      throw Error("edgemoe.predictor: '" + p + "' reads the bundle's routing profile, but there is none (expected " +
                  (store_.manifest().bundle_dir / "profile.json").string() +
                  " or edgemoe.profile; make one with: edgemoe-profile BUNDLE --corpus TEXT)");
  }
  if (!(options_.threshold > 0.0f && options_.threshold <= 1.0f))
    throw Error("edgemoe.prefetch_threshold: expected a probability in (0, 1], found " +
                std::to_string(options_.threshold));
}

Prefetcher::~Prefetcher() = default;

Prefetcher::Stream& Prefetcher::stream() {
  // One stream per (thread, prefetcher); ids are never reused, so a dead prefetcher's entry is only stale.
  thread_local std::unordered_map<uint64_t, std::unique_ptr<Stream>> streams;
  auto& s = streams[id_];
  if (!s) {
    if (streams.size() > 64) {  // bound what dead prefetchers leave behind on a long-lived thread
      for (auto it = streams.begin(); it != streams.end();) it = it->first != id_ ? streams.erase(it) : std::next(it);
    }
    s = std::make_unique<Stream>();
    s->reset(store_.manifest().layers.size());
  }
  return *s;
}

uint32_t Prefetcher::members(int32_t target, int32_t depth, const LayerSignals* s, const Stream& st) const {
  uint32_t avail = 0;
  if (profile_ && s && depth == 1 && target >= 1) avail |= kPredictTable;
  if (s && s->next_logits && depth - 1 < s->P) avail |= kPredictGates;
  if (!st.token_q[static_cast<size_t>(target)].empty()) avail |= kPredictToken;
  uint32_t want = modes_;
  // residual: a layer no ResidualPrefetch node targets (an older bundle, a layer the wiring skipped) is
  // predicted by the stacked gates where the call has them.
  if (modes_ == kPredictResidual && !residual_wired(target)) want |= kPredictGates;
  if (auto_ && profile_) {
    want = profile_->layers[static_cast<size_t>(target)].auto_members;
    // The best combination may need a signal this call lacks (e.g. table beyond l+1): use what is there.
    if (!(want & avail)) want = modes_;
  }
  return want & avail;
}

bool Prefetcher::predict(int32_t target, int32_t depth, uint32_t bits, const LayerSignals* s, const Stream& st,
                         std::vector<float>& q) const {
  const LayerInfo& info = store_.manifest().layers[static_cast<size_t>(target)];
  const size_t E = static_cast<size_t>(info.num_experts);
  q.assign(E, 0.0f);
  int members = 0;
  if (bits & kPredictTable) {
    const LayerProfile& lp = profile_->layers[static_cast<size_t>(target)];
    std::vector<double> keep(E, 1.0);
    const bool have2 = st.prev_layer == s->layer - 1 && static_cast<int64_t>(st.prev_sets.size()) == s->T;
    for (int64_t t = 0; t < s->T; ++t) {
      const std::vector<int32_t> cur = token_set(s->idx, t, s->K);
      const SparseDist* d = nullptr;
      if (have2) {
        auto it = lp.order2.find(RoutingProfile::key(st.prev_sets[static_cast<size_t>(t)], cur));
        if (it != lp.order2.end()) d = &it->second;
      }
      if (!d) {
        auto it = lp.order1.find(RoutingProfile::key(cur));
        if (it != lp.order1.end()) d = &it->second;
      }
      if (d) absorb(*d, keep);
      else absorb(lp.prior, keep);
    }
    for (size_t e = 0; e < E; ++e) q[e] += static_cast<float>(1.0 - keep[e]);
    ++members;
  }
  if (bits & kPredictGates) {
    if (static_cast<size_t>(s->E) == E) {
      std::vector<double> keep(E, 1.0), p(E);
      for (int64_t t = 0; t < s->T; ++t) {
        const float* z = s->next_logits + (t * s->P + (depth - 1)) * s->E;
        double mx = -INFINITY;
        for (size_t e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(z[e]));
        if (!std::isfinite(mx)) continue;
        double sum = 0;
        for (size_t e = 0; e < E; ++e) sum += (p[e] = std::exp(static_cast<double>(z[e]) - mx));
        for (size_t e = 0; e < E; ++e) keep[e] *= 1.0 - p[e] / sum;
      }
      for (size_t e = 0; e < E; ++e) q[e] += static_cast<float>(1.0 - keep[e]);
      ++members;
    }
  }
  if (bits & kPredictToken) {
    const std::vector<float>& tq = st.token_q[static_cast<size_t>(target)];
    for (size_t e = 0; e < E && e < tq.size(); ++e) q[e] += tq[e];
    ++members;
  }
  if (members == 0) return false;
  for (auto& v : q) v = std::min(1.0f, v / static_cast<float>(members));
  return true;
}

bool Prefetcher::gate_unimportance(int32_t target, int32_t depth, const LayerSignals& s,
                                   std::vector<float>& out) const {
  const LayerInfo& info = store_.manifest().layers[static_cast<size_t>(target)];
  const size_t E = static_cast<size_t>(info.num_experts);
  const int64_t K = info.top_k;
  if (!s.next_logits || depth - 1 >= s.P || static_cast<size_t>(s.E) != E) return false;
  out.assign(E, 2.0f);  // > 1: not among any token's predicted top K
  std::vector<int32_t> order(E);
  std::vector<float> w(static_cast<size_t>(K)), u(static_cast<size_t>(K));
  for (int64_t t = 0; t < s.T; ++t) {
    const float* z = s.next_logits + (t * s.P + (depth - 1)) * s.E;
    for (size_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
    const size_t k = std::min(E, static_cast<size_t>(K));
    auto score = [&](int32_t e) { return std::isnan(z[e]) ? -INFINITY : z[e]; };  // a strict weak order
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                      [&](int32_t a, int32_t b) {
                        const float sa = score(a), sb = score(b);
                        return sa > sb || (sa == sb && a < b);
                      });
    // the softmax's normalization cancels in the top-K renormalization: weights exp(z - max) suffice
    const float mx = score(order[0]);
    if (!std::isfinite(mx)) continue;
    for (size_t i = 0; i < k; ++i) w[i] = std::exp(score(order[i]) - mx);
    unimportance(w.data(), static_cast<int64_t>(k), u.data());
    for (size_t i = 0; i < k; ++i) out[static_cast<size_t>(order[i])] = std::min(out[static_cast<size_t>(order[i])], u[i]);
  }
  return true;
}

bool Prefetcher::select(int32_t target, int32_t distance, double lead_layers, bool batch, bool residual,
                        const std::vector<float>& q, Stream& st, std::vector<Read>& reads,
                        const std::vector<float>* s_pred) const {
  const int64_t K = store_.manifest().layers[static_cast<size_t>(target)].top_k;
  const StoreStats& stats = *store_.stats();
  const uint64_t read_bytes = stats.bytes_read.load(std::memory_order_relaxed);
  const double ns_per_byte =
      read_bytes ? static_cast<double>(stats.read_ns.load(std::memory_order_relaxed)) / static_cast<double>(read_bytes)
                 : 0.0;
  std::vector<int32_t> order(q.size());
  for (size_t e = 0; e < q.size(); ++e) order[e] = static_cast<int32_t>(e);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return q[a] > q[b]; });
  // Every expert of the target layer is protected with its probability, not only the ones read: a resident
  // expert of that layer is as likely to be needed as its probability says, and a prefetch may only replace
  // one that is less likely than itself.
  remember(target, distance, batch, residual, q, st);
  const bool dynamic = precision_.mode == MissPrecision::Dynamic;
  double top = 0;  // dynamic: the predicted weights of the top K, for each one's predicted unimportance
  for (int64_t i = 0; dynamic && i < K && i < static_cast<int64_t>(order.size()); ++i) top += q[static_cast<size_t>(order[static_cast<size_t>(i)])];
  double above = 0;
  bool all_resident = true;
  int64_t selected = 0;
  for (int64_t i = 0; i < K && i < static_cast<int64_t>(order.size()); ++i) {
    const int32_t e = order[static_cast<size_t>(i)];
    const float c = q[static_cast<size_t>(e)];
    if (!(c >= options_.threshold)) break;
    ++selected;
    int32_t variant = kPrimary;
    // predicted unimportance: from the stacked gates' predicted weights, else from q's rank order
    const float s = s_pred ? (*s_pred)[static_cast<size_t>(e)] : top > 0 ? static_cast<float>(above / top) : 0.0f;
    above += c;
    if (dynamic) {
      const Precision p = precision_for(s, precision_);
      if (p == Precision::Skip) continue;  // a miss of it would be skipped: nothing to read
      if (p == Precision::Low && store_.manifest().twin(target, e)) variant = kTwin;
    }
    if (store_.is_resident(target, e) || (variant == kTwin && store_.is_resident(target, e, kTwin))) continue;
    all_resident = false;
    // The cost rule (prefetch_cost.h): read it only if the expected saving exceeds the expected cost.
    const float p = cost_.calibrated(c, distance, batch, residual);
    const PrefetchGain g = cost_.evaluate(p, lead_layers, store_.manifest().record(target, e, variant).length,
                                          ns_per_byte);
    if (!g.read) {
      store_.stats()->count(&LayerCounters::prefetch_declined, target,
                            thread_stats_current(store_.options().store_id).get());
      continue;
    }
    reads.push_back(Read{target, e, distance, std::clamp(g.victim_below, 1e-6f, 1.0f), variant});
  }
  return selected > 0 && all_resident;  // nothing confident enough: no reason to look further
}

void Prefetcher::issue(const std::vector<Read>& reads) {
  for (const Read& r : reads) store_.prefetch(r.layer, r.expert, PrefetchHint{r.distance, r.confidence}, r.variant);
}

void Prefetcher::remember(int32_t target, int32_t distance, bool batch, bool residual,
                          const std::vector<float>& q, Stream& st) const {
  auto& pred = st.predicted[static_cast<size_t>(target)];
  st.predicted_distance[static_cast<size_t>(target)] = distance;
  st.predicted_batch[static_cast<size_t>(target)] = batch;
  st.predicted_residual[static_cast<size_t>(target)] = residual;
  pred.clear();
  for (size_t e = 0; e < q.size(); ++e)
    if (q[e] >= kMinProtection) pred.emplace_back(static_cast<int32_t>(e), std::min(1.0f, q[e]));
}

std::vector<std::pair<ExpertKey, float>> Prefetcher::protections(int32_t after, const Stream& st) const {
  std::vector<std::pair<ExpertKey, float>> out;
  const int32_t L = static_cast<int32_t>(store_.manifest().layers.size());
  for (int32_t t = after + 1; t < L; ++t) {
    const auto& pred = st.predicted[static_cast<size_t>(t)];
    if (!pred.empty()) {  // calibrated: compared with what a prefetch saves (prefetch_cost.h)
      const int32_t d = st.predicted_distance[static_cast<size_t>(t)];
      const bool batch = st.predicted_batch[static_cast<size_t>(t)] != 0;
      const bool residual = st.predicted_residual[static_cast<size_t>(t)] != 0;
      for (const auto& [e, c] : pred)
        out.emplace_back(ExpertKey{t, e}, cost_.keep_value(cost_.calibrated(c, d, batch, residual)));
      continue;
    }
    // Not predicted (yet) by the layer before: the token table's guess still keeps its experts (no read).
    const auto& tq = st.token_q[static_cast<size_t>(t)];
    for (size_t e = 0; e < tq.size(); ++e)
      if (tq[e] >= kMinProtection) out.emplace_back(ExpertKey{t, static_cast<int32_t>(e)}, std::min(1.0f, tq[e]));
  }
  return out;
}

void Prefetcher::on_tokens(const int64_t* ids, int64_t n) {
  Stream& st = stream();
  const size_t L = store_.manifest().layers.size();
  st.reset(L);
  if (!(modes_ & kPredictToken) || !profile_ || n <= 0) return;
  for (size_t l = 0; l < L; ++l) {
    const LayerProfile& lp = profile_->layers[l];
    std::vector<double> keep(static_cast<size_t>(lp.num_experts), 1.0);
    for (int64_t t = 0; t < n; ++t) {
      auto it = lp.tokens.find(ids[t]);
      if (it != lp.tokens.end()) absorb(it->second, keep);
      else absorb(lp.prior, keep);
    }
    st.token_q[l].resize(keep.size());
    for (size_t e = 0; e < keep.size(); ++e) st.token_q[l][e] = static_cast<float>(1.0 - keep[e]);
  }
  // Token start: read what the token alone predicts for the layers that will use it (auto: where the profile
  // chose the token table; token: every layer), nearest layer first.
  std::vector<float> q;
  std::vector<Read> reads;
  for (size_t l = 0; l < L; ++l) {
    const int32_t t = static_cast<int32_t>(l);
    if (auto_ && !(profile_->layers[l].auto_members & kPredictToken)) continue;
    if (auto_ && t > 0) continue;  // auto: later layers are predicted at the layer before, with more signals
    if (!predict(t, 1, kPredictToken, nullptr, st, q)) continue;
    // lead: the layers before t, and about half of t's own (its attention runs before its experts)
    select(t, t, t + 0.5, n > 1, false, q, st, reads);
  }
  // before the reads: they may only replace less likely experts
  store_.protect(protections(-1, st), static_cast<float>(cost_.reuse()));
  issue(reads);
}

void Prefetcher::learn(const LayerSignals& s, Stream& st) {
  // The interval since the previous layer call of this pass: compute per layer and the device's busy share.
  const uint64_t now = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                 std::chrono::steady_clock::now().time_since_epoch())
                                                 .count());
  const std::shared_ptr<CallStats> mine = thread_stats_current(store_.options().store_id);
  const uint64_t stall = mine ? mine->total.stall_ns.load(std::memory_order_relaxed)
                              : store_.stats()->stall_ns.load(std::memory_order_relaxed);
  const uint64_t busy = store_.io_busy_ns();
  const uint64_t hits = mine ? mine->total.hits.load(std::memory_order_relaxed)
                             : store_.stats()->hits.load(std::memory_order_relaxed);
  if (st.prev_layer < 0 && s.T == 1) {  // the first layer call of a single-token pass: the pass before it
    if (st.have_pass && hits >= st.pass_hits)
      cost_.observe_pass(static_cast<double>(hits - st.pass_hits), static_cast<double>(store_.resident_keys().size()));
    st.pass_hits = hits;
    st.have_pass = true;
  }
  if (st.prev_ns && st.prev_layer == s.layer - 1 && now > st.prev_ns)
    cost_.observe_interval(static_cast<double>(now - st.prev_ns),
                           static_cast<double>(stall - std::min(stall, st.prev_stall_ns)),
                           static_cast<double>(busy - std::min(busy, st.prev_busy_ns)));
  st.prev_ns = now;
  st.prev_stall_ns = stall;
  st.prev_busy_ns = busy;
  // How the predictions for this layer turned out (single-token calls only: calibration).
  const size_t l = static_cast<size_t>(s.layer);
  if (s.T != 1 || st.predicted_batch[l] || st.predicted[l].empty()) return;
  const std::vector<int32_t> used = token_set(s.idx, 0, s.K);
  for (const auto& [e, q] : st.predicted[l])
    cost_.observe_prediction(q, st.predicted_distance[l], std::binary_search(used.begin(), used.end(), e),
                             st.predicted_residual[l] != 0);
}

void Prefetcher::on_layer(const LayerSignals& s) {
  if (!modes_) return;
  Stream& st = stream();
  const int32_t L = static_cast<int32_t>(store_.manifest().layers.size());
  if (s.layer <= st.last_layer) st.reset(static_cast<size_t>(L));  // a new pass without a TokenPrefetch node
  st.last_layer = s.layer;
  learn(s, st);
  st.predicted[static_cast<size_t>(s.layer)].clear();
  if (s.layer + 1 < L) st.early_bits[static_cast<size_t>(s.layer + 1)] = 0;
  std::vector<float> q, s_pred;
  std::vector<Read> reads;
  for (int32_t d = 1; d <= options_.depth && s.layer + d < L; ++d) {
    const int32_t target = s.layer + d;
    const uint32_t bits = members(target, d, &s, st);
    // auto, where the profile chose residual for `target` and a ResidualPrefetch node targets it: that node
    // predicts it; this call reads nothing for it and only computes the other members' mean for the node.
    const uint32_t chosen = auto_ && profile_ ? profile_->layers[static_cast<size_t>(target)].auto_members : 0u;
    if ((chosen & kPredictResidual) && residual_wired(target)) {
      const uint32_t others = chosen & ~kPredictResidual;
      if (d == 1 && others && bits == others && predict(target, d, bits, &s, st, q)) {
        st.early_q[static_cast<size_t>(target)] = q;
        st.early_bits[static_cast<size_t>(target)] = bits;
      }
      break;
    }
    if (!bits || !predict(target, d, bits, &s, st, q)) break;
    const bool gated = precision_.mode == MissPrecision::Dynamic && gate_unimportance(target, d, s, s_pred);
    // adaptive depth: further only while all is resident
    if (!select(target, d, d, s.T > 1, false, q, st, reads, gated ? &s_pred : nullptr)) break;
  }
  // before the reads: they may only replace less likely experts
  store_.protect(protections(s.layer, st), static_cast<float>(cost_.reuse()));
  issue(reads);
  // This call's experts become the "previous layer" of the next call's table lookup.
  st.prev_sets.resize(static_cast<size_t>(s.T));
  for (int64_t t = 0; t < s.T; ++t) st.prev_sets[static_cast<size_t>(t)] = token_set(s.idx, t, s.K);
  st.prev_layer = s.layer;
}

void Prefetcher::wire_residual(int32_t target) {
  if (target >= 0 && static_cast<size_t>(target) < store_.manifest().layers.size())
    residual_wired_[static_cast<size_t>(target)].store(true, std::memory_order_relaxed);
}

bool Prefetcher::residual_wired(int32_t target) const {
  return target >= 0 && static_cast<size_t>(target) < store_.manifest().layers.size() &&
         residual_wired_[static_cast<size_t>(target)].load(std::memory_order_relaxed);
}

void Prefetcher::on_residual(int32_t target, const float* scores, int64_t T, int64_t E) {
  if (!(modes_ & kPredictResidual) || T <= 0) return;
  const int32_t L = static_cast<int32_t>(store_.manifest().layers.size());
  if (target < 0 || target >= L) return;
  const size_t t = static_cast<size_t>(target);
  const size_t n = static_cast<size_t>(store_.manifest().layers[t].num_experts);
  if (static_cast<size_t>(E) != n) return;  // the node checks it: never reached
  // auto: only where the profile chose residual (alone or with others: combined with the layer before's q)
  uint32_t others = 0;
  if (auto_ && profile_) {  // (auto without a profile has no residual member: returned above)
    const uint32_t want = profile_->layers[t].auto_members;
    if (!(want & kPredictResidual)) return;
    others = want & ~kPredictResidual;
  }
  Stream& st = stream();
  if (target <= st.last_layer) st.reset(static_cast<size_t>(L));  // a new pass whose first node is this one
  // q(e) = 1 - prod_t (1 - p_t(e)) over the call's tokens, as the other predictors
  std::vector<double> keep(n, 1.0);
  for (int64_t i = 0; i < T; ++i) {
    const float* p = scores + i * E;
    for (size_t e = 0; e < n; ++e) {
      const double v = std::isfinite(p[e]) ? std::clamp(static_cast<double>(p[e]), 0.0, 1.0) : 0.0;
      keep[e] *= 1.0 - v;
    }
  }
  std::vector<float> q(n);
  for (size_t e = 0; e < n; ++e) q[e] = static_cast<float>(1.0 - keep[e]);
  if (others && st.early_bits[t] == others && st.early_q[t].size() == n) {  // the mean with the other members
    const float members = static_cast<float>(std::bitset<32>(others).count());
    for (size_t e = 0; e < n; ++e) q[e] = std::min(1.0f, (st.early_q[t][e] * members + q[e]) / (members + 1.0f));
  }
  std::vector<Read> reads;
  // lead: the target layer's attention, about half a layer (as at token start)
  select(target, 1, 0.5, T > 1, true, q, st, reads);
  store_.protect(protections(target - 1, st), static_cast<float>(cost_.reuse()));
  issue(reads);
}

}  // namespace edgemoe
