// Unit tests of the engine's pieces: the arena (expert memory <= budget), the read scheduler (demand before
// prefetch, promotion, cancellation), prefetch protection, the cache policies' choices and the config table.
#include "store_testing.h"

#include "edgemoe/config.h"
#include "edgemoe/moe_plan.h"

using Clock = std::chrono::steady_clock;
static double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

static void test_arena() {
  const uint64_t page = 4096;
  ExpertArena a(4 * page, ArenaOptions{});
  {
    ExpertArena::Buffer b1 = a.take(2 * page);
    ExpertArena::Buffer b2 = a.take(2 * page);
    CHECK(b1 && b2);
    std::memset(b1.data(), 1, 2 * page);
    CHECK_EQ(a.mapped_bytes(), 4 * page);
    bool threw = false;
    try {
      ExpertArena::Buffer b3 = a.take(page);  // over capacity: refused, never mapped
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    CHECK(threw);
    CHECK_EQ(a.mapped_bytes(), 4 * page);
  }
  CHECK_EQ(a.mapped_bytes(), 4 * page);  // both pooled
  {
    ExpertArena::Buffer b = a.take(2 * page);  // reuses a pooled mapping of that size
    CHECK_EQ(a.mapped_bytes(), 4 * page);
    ExpertArena::Buffer c = a.take(page);  // another size: a pooled 2-page buffer is unmapped first
    CHECK(a.mapped_bytes() <= 4 * page);
    CHECK_EQ(a.mapped_bytes(), 3 * page);
  }
  a.trim();
  CHECK_EQ(a.mapped_bytes(), uint64_t{0});
  CHECK_EQ(a.peak_mapped_bytes(), 4 * page);
}

static StoreOptions slow(uint64_t budget, int threads, double latency_ms) {
  StoreOptions o = opts(budget);
  o.io_threads = threads;
  o.throttle_latency_us = latency_ms * 1000;
  return o;
}

static void test_demand_before_prefetches() {
  // One I/O thread, 30 ms per read. Nine prefetches are queued, then a demand miss arrives: it waits for at
  // most the read in flight, then runs (a FIFO would make it wait for all nine: ~300 ms).
  TestBundle b = make_bundle(g_root / "prio", {{12, 16, 24}});
  const double lat = 30;
  ExpertStore s(load_manifest(b.dir), slow(0, 1, lat));
  for (int e = 0; e < 9; ++e) CHECK(s.prefetch(0, e, PrefetchHint{1, 0.5f}));
  const auto t0 = Clock::now();
  ExpertStore::Pin p = s.acquire(0, 10);
  CHECK(blob_ok(p));
  const double took = ms_since(t0);
  std::printf("  demand miss behind 9 prefetches: %.1f ms (one read: %.0f ms)\n", took, lat);
  CHECK(took < 3.5 * lat);
  CHECK(s.queued_reads() >= 6);  // the prefetches are still waiting
  s.drain();
  CHECK_EQ(s.stats()->reads.load(), uint64_t{10});
}

static void test_scheduler_order() {
  // One I/O thread held by a first task; the queued ones then run demand first, prefetches by distance, then
  // confidence, then arrival; a promoted prefetch runs as a demand; a cancelled one never runs.
  struct Task : ReadTask {
    int id = 0;
  };
  std::mutex mu;
  std::condition_variable cv;
  bool release = false, started = false;
  std::vector<int> ran;
  ReadScheduler sched(1, [&](const std::shared_ptr<ReadTask>& t) {
    std::unique_lock<std::mutex> lk(mu);
    const int id = static_cast<const Task&>(*t).id;
    if (id == 0) {
      started = true;
      cv.notify_all();
      cv.wait(lk, [&] { return release; });
    }
    ran.push_back(id);
    cv.notify_all();
  });
  auto task = [](int id, ReadPriority p) {
    auto t = std::make_shared<Task>();
    t->id = id;
    t->priority = p;
    return t;
  };
  using K = ReadPriority::Kind;
  sched.submit(ReadScheduler::prepare(), task(0, {K::Demand, 0, 1.0f}));
  {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return started; });
  }
  auto promoted = task(6, {K::Prefetch, 5, 0.1f});
  sched.submit(ReadScheduler::prepare(), task(1, {K::Prefetch, 2, 0.5f}));
  sched.submit(ReadScheduler::prepare(), task(2, {K::Prefetch, 1, 0.3f}));
  sched.submit(ReadScheduler::prepare(), task(3, {K::Prefetch, 1, 0.9f}));
  sched.submit(ReadScheduler::prepare(), task(4, {K::Demand, 0, 1.0f}));
  sched.submit(ReadScheduler::prepare(), task(5, {K::Prefetch, 2, 0.5f}));
  sched.submit(ReadScheduler::prepare(), promoted);
  sched.submit(ReadScheduler::prepare(), task(7, {K::Prefetch, 1, 0.9f}));
  CHECK(sched.promote(*promoted, {K::Demand, 0, 1.0f}));
  const auto dropped = sched.cancel_if([](const ReadTask& t) { return static_cast<const Task&>(t).id == 7; });
  CHECK_EQ(dropped.size(), size_t{1});
  CHECK_EQ(sched.queue_size(), size_t{6});
  {
    std::unique_lock<std::mutex> lk(mu);
    release = true;
    cv.notify_all();
    cv.wait(lk, [&] { return ran.size() == 7; });
  }
  CHECK((ran == std::vector<int>{0, 4, 6, 3, 2, 1, 5}));
  CHECK(!sched.promote(*promoted, {K::Demand, 0, 1.0f}));  // done: not queued any more
}

static void test_prefetch_promotion() {
  // A demand for a queued prefetch promotes it: it runs next, and every blob is read once.
  TestBundle b = make_bundle(g_root / "promote", {{12, 16, 24}});
  const double lat = 30;
  ExpertStore s(load_manifest(b.dir), slow(0, 1, lat));
  auto st = s.stats();
  CHECK(s.prefetch(0, 0, PrefetchHint{1, 1.0f}));  // taken by the I/O thread at once
  for (int e = 1; e <= 8; ++e) CHECK(s.prefetch(0, e, PrefetchHint{3, 0.9f}));
  const auto t0 = Clock::now();
  ExpertStore::Pin p = s.acquire(0, 8);  // queued last among 1..8: promoted to a demand read
  CHECK(blob_ok(p));
  const double took = ms_since(t0);
  std::printf("  demand of a queued prefetch: %.1f ms\n", took);
  CHECK(took < 3.5 * lat);
  CHECK_EQ(st->prefetch_promoted.load(), uint64_t{1});
  CHECK_EQ(st->prefetch_late.load(), uint64_t{1});
  s.drain();
  CHECK_EQ(st->reads.load(), uint64_t{9});  // every blob read exactly once
  CHECK_EQ(st->misses.load(), uint64_t{1});
}

static void test_end_call_cancels_useless_prefetches() {
  TestBundle b = make_bundle(g_root / "cancel", {{4, 16, 24}, {6, 16, 24}});
  const double lat = 30;
  ExpertStore s(load_manifest(b.dir), slow(0, 1, lat));
  auto st = s.stats();
  s.begin_call(0);
  for (int e = 0; e < 6; ++e) CHECK(s.prefetch(1, e, PrefetchHint{1, 0.5f}));
  CHECK(s.prefetch(0, 3, PrefetchHint{0, 0.5f}));
  s.end_call(0);  // layer 0's own queued prefetch is useless now; layer 1's stay
  CHECK_EQ(st->prefetch_cancelled.load(), uint64_t{1});
  CHECK(!s.is_resident(0, 3));
  s.begin_call(1);
  {
    ExpertStore::Pin p = s.acquire(1, 5);  // promoted
    CHECK(blob_ok(p));
  }
  s.end_call(1);  // layer 1 ran: its prefetches still queued are dropped, their bytes returned
  s.drain();
  const uint64_t cancelled = st->prefetch_cancelled.load();
  CHECK(cancelled >= 3);
  CHECK_EQ(st->reads.load() + cancelled, uint64_t{7});
  uint64_t resident = 0;
  for (int e = 0; e < 6; ++e)
    if (s.is_resident(1, e)) resident += b.length(1, e);
  CHECK_EQ(s.resident_bytes(), resident);
}

static void test_prefetch_protection() {
  TestBundle b = make_bundle(g_root / "protect", {{6, 16, 24}});
  const uint64_t L = b.length(0, 0);
  ExpertStore s(load_manifest(b.dir), opts(2 * L));
  auto st = s.stats();
  { ExpertStore::Pin p = s.acquire(0, 0); CHECK(blob_ok(p)); }
  { ExpertStore::Pin p = s.acquire(0, 1); CHECK(blob_ok(p)); }
  s.protect({{{0, 0}, 0.9f}});
  CHECK(s.prefetch(0, 2, PrefetchHint{1, 0.5f}));  // may evict only 1, which the prediction left out
  s.drain();
  CHECK(s.is_resident(0, 0) && !s.is_resident(0, 1) && s.is_resident(0, 2));
  s.protect({{{0, 0}, 0.9f}, {{0, 2}, 0.6f}});
  CHECK(!s.prefetch(0, 3, PrefetchHint{1, 0.5f}));  // never evicts for a less likely expert
  CHECK_EQ(st->prefetch_dropped.load(), uint64_t{1});
  CHECK(s.prefetch(0, 3, PrefetchHint{1, 0.7f}));  // more likely than 2 (0.6): 2 goes, 0 (0.9) stays
  s.drain();
  CHECK(s.is_resident(0, 0) && !s.is_resident(0, 2) && s.is_resident(0, 3));
  {
    ExpertStore::Pin p0 = s.acquire(0, 0);
    ExpertStore::Pin p3 = s.acquire(0, 3);
    CHECK(!s.prefetch(0, 4, PrefetchHint{1, 1.0f}));  // everything pinned: nothing to evict, no wait
  }
  // A demand read may evict protected experts (it must make progress).
  { ExpertStore::Pin p = s.acquire(0, 5); CHECK(blob_ok(p)); }
  CHECK(st->peak_resident_bytes.load() <= 2 * L);
  CHECK(st->peak_arena_bytes.load() <= 2 * L);
}

// Uses (layer, expert) once inside a call of its layer.
static void use(ExpertStore& s, int l, int e) {
  s.begin_call(l);
  {
    ExpertStore::Pin p = s.acquire(l, e);
    CHECK(blob_ok(p));
  }
  s.end_call(l);
}

static void test_policy_choices() {
  TestBundle b = make_bundle(g_root / "pol", {{4, 16, 24}, {4, 16, 24}});
  const uint64_t L = b.length(0, 0);
  {  // lfu keeps the frequent 0 where lru would keep the recent 1
    ExpertStore s(load_manifest(b.dir), opts(2 * L, "lfu"));
    use(s, 0, 0); use(s, 0, 0); use(s, 0, 0); use(s, 0, 1); use(s, 0, 2);
    CHECK(s.is_resident(0, 0) && !s.is_resident(0, 1) && s.is_resident(0, 2));
    ExpertStore r(load_manifest(b.dir), opts(2 * L, "lru"));
    use(r, 0, 0); use(r, 0, 0); use(r, 0, 0); use(r, 0, 1); use(r, 0, 2);
    CHECK(!r.is_resident(0, 0) && r.is_resident(0, 1) && r.is_resident(0, 2));
  }
  {  // edgemoe: during layer 1, the expert of layer 0 (the next layer to run, d = 1) outranks layer 1's (d = 2)
    ExpertStore s(load_manifest(b.dir), opts(2 * L, "edgemoe"));
    use(s, 0, 0);
    use(s, 1, 0);
    use(s, 1, 1);  // evicts (1, 0): f/d = 1/2 < (0, 0)'s 1/1 (lru would evict (0, 0))
    CHECK(s.is_resident(0, 0) && !s.is_resident(1, 0) && s.is_resident(1, 1));
  }
  {  // hobbit with only the layer-distance weight behaves the same way
    StoreOptions o = opts(2 * L, "hobbit");
    o.policy_weights = parse_policy_weights("lru=0,lfu=0,lhu=0,fld=1");
    ExpertStore s(load_manifest(b.dir), o);
    use(s, 0, 0);
    use(s, 1, 0);
    use(s, 1, 1);
    CHECK(s.is_resident(0, 0) && !s.is_resident(1, 0) && s.is_resident(1, 1));
  }
  {  // pinned: the most frequent experts stay whatever the recency
    const fs::path f = b.dir / "freq.json";
    std::ofstream(f) << R"({"expert_frequency": [[1, 9, 2, 3], [0, 0, 0, 8]]})";
    StoreOptions o = opts(3 * L, "pinned");
    o.frequencies = f.string();
    ExpertStore s(load_manifest(b.dir), o);  // room for 2 pinned: (0, 1) and (1, 3)
    use(s, 0, 1); use(s, 1, 3); use(s, 0, 0); use(s, 0, 2); use(s, 0, 3); use(s, 1, 0);
    CHECK(s.is_resident(0, 1) && s.is_resident(1, 3) && s.is_resident(1, 0));
    CHECK(!s.is_resident(0, 0) && !s.is_resident(0, 2) && !s.is_resident(0, 3));
    o.pin_experts = 3;  // 3 pinned + 1 slot > 3 experts of budget
    EXPECT_ERROR(ExpertStore(load_manifest(b.dir), o), "edgemoe.pin_experts", "budget - largest blob");
    o.frequencies.clear();
    EXPECT_ERROR(ExpertStore(load_manifest(b.dir), o), "pinned", "edgemoe.frequencies");
    std::ofstream(f) << R"({"expert_frequency": [[1, 9, 2], [0, 0, 0, 8]]})";
    o.frequencies = f.string();
    EXPECT_ERROR(ExpertStore(load_manifest(b.dir), o), f.string(), "expert_frequency[0]", "4 numbers");
  }
  EXPECT_ERROR(find_policy("fifo"), "edgemoe.policy", "lru, lfu, edgemoe, hobbit, pinned, none", "'fifo'");
  EXPECT_ERROR(parse_policy_weights("lru=2"), "edgemoe.policy_weights", "'2'");
  EXPECT_ERROR(parse_policy_weights("lrx=0.5"), "edgemoe.policy_weights", "unknown name 'lrx'");
}

static void test_config_table() {
  std::set<std::string> names;
  for (const ConfigKey& k : config_keys()) {
    CHECK(names.insert(k.name).second);
    CHECK(std::string(k.name).rfind("edgemoe.", 0) == 0);
    CHECK(std::string(k.doc).size() > 10);
  }
  CHECK(names.count("edgemoe.policy") && names.count("edgemoe.budget") && names.count("edgemoe.bundle_dir"));
  const json j = json::parse(config_keys_json());
  CHECK_EQ(j.size(), config_keys().size());
  // Every value-checked key rejects garbage with an error naming it.
  for (const char* key : {"edgemoe.budget", "edgemoe.policy", "edgemoe.policy_weights", "edgemoe.pin_experts",
                          "edgemoe.io_mode", "edgemoe.io_threads", "edgemoe.verify_checksums", "edgemoe.mlock",
                          "edgemoe.hugepages", "edgemoe.throttle_bw", "edgemoe.throttle_latency_us"}) {
    EXPECT_ERROR(read_runtime_config([&](const char* k, std::string* v) {
                   if (std::string(k) == "edgemoe.bundle_dir") return *v = g_root.string(), true;
                   if (std::string(k) == key) return *v = "garbage!", true;
                   return false;
                 }),
                 key);
  }
  EXPECT_ERROR(read_runtime_config([](const char*, std::string*) { return false; }), "edgemoe.bundle_dir", "not set");
  const RuntimeConfig c = read_runtime_config([&](const char* k, std::string* v) {
    if (std::string(k) == "edgemoe.bundle_dir") return *v = g_root.string(), true;
    if (std::string(k) == "edgemoe.policy") return *v = "hobbit", true;
    if (std::string(k) == "edgemoe.policy_weights") return *v = "fld=0.5", true;
    return false;
  });
  CHECK(c.store.policy == "hobbit" && c.store.policy_weights.fld == 0.5 && c.store.policy_weights.lru == 0.25);
  CHECK(c.store.store_id == c.bundle_dir);
}

static void test_scratch_trim() {
  FloatScratch s;
  s.get(16);
  CHECK(s.bytes() >= 64 && s.bytes() <= FloatScratch::kScratchKeepBytes);
  s.trim();
  CHECK(s.bytes() > 0);  // small scratch is kept for the next call
  s.get(FloatScratch::kScratchKeepBytes);  // a prefill-sized call
  s.trim();
  CHECK_EQ(s.bytes(), size_t{0});
}

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"arena", test_arena},
      {"demand_before_prefetches", test_demand_before_prefetches},
      {"scheduler_order", test_scheduler_order},
      {"prefetch_promotion", test_prefetch_promotion},
      {"end_call_cancels_useless_prefetches", test_end_call_cancels_useless_prefetches},
      {"prefetch_protection", test_prefetch_protection},
      {"policy_choices", test_policy_choices},
      {"config_table", test_config_table},
      {"scratch_trim", test_scratch_trim},
  };
  return run_tests("test_engine", tests);
}
