// Unit tests of the manifest reader, the expert store/cache and the MoE compute.
#include "store_testing.h"

// --- tests -----------------------------------------------------------------------------------------------
static void test_manifest_errors() {
  const fs::path d = g_root / "bad";
  auto fresh = [&] { return make_bundle(d, {{4, 16, 24}}); };
  {
    TestBundle b = fresh();
    Manifest m = load_manifest(d);
    CHECK_EQ(m.layers.size(), size_t{1});
    CHECK_EQ(m.num_records(), size_t{4});
    CHECK_EQ(m.record_index(0, 3), size_t{3});
  }
  {
    TestBundle b = fresh();
    b.manifest["store"]["file"] = "../experts.bin";
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "manifest.json", "store.file", "inside the bundle");
    b.manifest["store"]["file"] = "/etc/passwd";
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "store.file", "absolute");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"][2]["offset"] = b.manifest["store"]["size"].get<uint64_t>();
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 2", "past the end of the store", "expected <=");
  }
  {
    TestBundle b = fresh();
    fs::resize_file(d / "experts.bin", fs::file_size(d / "experts.bin") - 4096);
    EXPECT_ERROR(load_manifest(d), "experts.bin", "truncated store", "expected", "found");
  }
  {
    TestBundle b = fresh();
    fs::remove(d / "experts.bin");
    EXPECT_ERROR(load_manifest(d), "experts.bin", "missing store", "found nothing");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"][1]["tensors"]["w_out"]["nbytes"] = 12;
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 1", "tensors.w_out.nbytes", "expected", "found 12");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"][1]["tensors"]["w_in"]["shape"] = {48, 17};
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 1", "tensors.w_in.shape", "[48, 16]");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"][3]["offset"] = 4096 + 1;
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 3", "misaligned offset");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"].erase(1);
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 1", "missing expert record");
  }
  {
    TestBundle b = fresh();
    b.manifest["experts"][0]["format"]["dtype"] = "int5";
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 0", "unknown dtype", "'int5'");
  }
  {
    TestBundle b = fresh();
    b.manifest["format_version"] = 3;
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "format_version", "expected 1 or 2", "found 3");
  }
  {
    TestBundle b = fresh();
    EXPECT_ERROR(load_manifest(d, "../manifest.json"), "manifest", "..");
  }
  {  // dimensions whose byte counts would wrap around uint64 (2^58 * 16 * 4 == 2^64 == 0)
    TestBundle b = fresh();
    b.manifest["layers"][0]["intermediate"] = int64_t{1} << 58;
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layers[0].intermediate", "<= 2^24");
  }
  {  // a group size so large that ceil(cols / group) overflows
    TestBundle b = fresh();
    b.manifest["experts"][0]["format"] = {{"dtype", "int8"}, {"group_size", INT64_MAX - 7}, {"scheme", "asym_u"}};
    b.write_manifest();
    EXPECT_ERROR(load_manifest(d), "layer 0 expert 0", "format.group_size", "<= 2^24");
  }
}

static void test_parse_budget() {
  CHECK_EQ(parse_budget("268435456", 10), uint64_t{268435456});
  CHECK_EQ(parse_budget("256MB", 10), uint64_t{256000000});
  CHECK_EQ(parse_budget("1GiB", 10), uint64_t{1} << 30);
  CHECK_EQ(parse_budget("1.5 KiB", 10), uint64_t{1536});
  CHECK_EQ(parse_budget("25%", 1000), uint64_t{250});
  CHECK_EQ(parse_budget("", 1234), uint64_t{1234});
  EXPECT_ERROR(parse_budget("12 parsecs", 10), "edgemoe.budget", "unknown unit");
  EXPECT_ERROR(parse_budget("0", 10), "edgemoe.budget");
  EXPECT_ERROR(parse_budget("150%", 10), "edgemoe.budget");
  EXPECT_ERROR(parse_budget("-5", 10), "edgemoe.budget");
}

static void test_budget_below_largest() {
  TestBundle b = make_bundle(g_root / "small", {{4, 16, 24}, {2, 32, 64}});
  Manifest m = load_manifest(b.dir);
  EXPECT_ERROR(ExpertStore(m, opts(b.largest() - 1)), "edgemoe.budget", "budget below the largest expert",
               "layer 1 expert", std::to_string(b.largest()));
  ExpertStore ok(m, opts(b.largest()));
  CHECK_EQ(ok.budget_bytes(), b.largest());
}

static void test_lru_order_and_pins() {
  TestBundle b = make_bundle(g_root / "lru", {{6, 16, 24}});
  const uint64_t L = b.length(0, 0);
  ExpertStore s(load_manifest(b.dir), opts(2 * L));
  auto use = [&](int e) {
    ExpertStore::Pin p = s.acquire(0, e);
    CHECK(blob_ok(p));
  };
  auto st = s.stats();
  use(0);
  use(1);
  CHECK_EQ(st->misses.load(), uint64_t{2});
  use(0);  // hit; LRU order now 1, 0
  CHECK_EQ(st->hits.load(), uint64_t{1});
  use(2);  // evicts 1
  CHECK(s.is_resident(0, 0) && s.is_resident(0, 2) && !s.is_resident(0, 1));
  CHECK_EQ(st->evictions.load(), uint64_t{1});
  use(0);  // hit
  CHECK_EQ(st->hits.load(), uint64_t{2});
  use(1);  // miss, evicts 2 (LRU)
  CHECK(s.is_resident(0, 0) && s.is_resident(0, 1) && !s.is_resident(0, 2));

  // Pin protection: with 0 and 1 pinned, nothing can be evicted for 3.
  {
    ExpertStore::Pin p0 = s.acquire(0, 0);
    ExpertStore::Pin p1 = s.acquire(0, 1);
    CHECK(!s.try_acquire(0, 3).has_value());
    CHECK(!s.prefetch(0, 3));
    CHECK_EQ(st->prefetch_dropped.load(), uint64_t{1});
    p0.release();  // 0 is now the LRU unpinned entry
    std::optional<ExpertStore::Pin> p3 = s.try_acquire(0, 3);
    CHECK(p3.has_value());
    CHECK(p3 && blob_ok(*p3));
    CHECK(!s.is_resident(0, 0) && s.is_resident(0, 1) && s.is_resident(0, 3));
  }
  CHECK(st->peak_resident_bytes.load() <= 2 * L);
  CHECK_EQ(s.resident_bytes(), 2 * L);

  // A blocked acquire waits for an unpin instead of exceeding the budget.
  {
    ExpertStore::Pin p1 = s.acquire(0, 1);
    ExpertStore::Pin p3 = s.acquire(0, 3);
    std::atomic<bool> got{false};
    std::thread t([&] {
      ExpertStore::Pin p4 = s.acquire(0, 4);
      got = true;
      CHECK(blob_ok(p4));
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(!got.load());
    p1.release();
    t.join();
    CHECK(got.load());
    CHECK(st->budget_waits.load() >= 1);
  }
  CHECK(st->peak_resident_bytes.load() <= 2 * L);
}

static void test_inflight_dedup_and_prefetch() {
  TestBundle b = make_bundle(g_root / "dedup", {{4, 64, 256}});
  ExpertStore s(load_manifest(b.dir), opts(0));
  auto st = s.stats();
  std::vector<std::thread> ts;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i) {
    ts.emplace_back([&] {
      ExpertStore::Pin p = s.acquire(0, 2);
      if (blob_ok(p)) ++ok;
    });
  }
  for (auto& t : ts) t.join();
  CHECK_EQ(ok.load(), 8);
  CHECK_EQ(st->reads.load(), uint64_t{1});
  CHECK_EQ(st->hits.load() + st->misses.load(), uint64_t{8});

  CHECK(s.prefetch(0, 1));
  CHECK(!s.prefetch(0, 1));  // in flight or resident: no-op
  {
    ExpertStore::Pin p = s.acquire(0, 1);
    CHECK(blob_ok(p));
  }
  CHECK_EQ(st->prefetch_issued.load(), uint64_t{1});
  CHECK_EQ(st->prefetch_hits.load() + st->prefetch_late.load(), uint64_t{1});
  CHECK_EQ(st->reads.load(), uint64_t{2});
  CHECK_EQ(st->checksums_verified.load(), uint64_t{2});
}

static void test_concurrent_budget() {
  // Two layers of different expert sizes; budget = 3 of the large ones; 4 threads acquire at random, hold,
  // sometimes two pins at once (non-blocking second), and verify every blob they see.
  TestBundle b = make_bundle(g_root / "conc", {{8, 32, 48}, {8, 64, 160}});
  const uint64_t budget = 3 * b.largest();
  ExpertStore s(load_manifest(b.dir), opts(budget));
  auto st = s.stats();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> max_seen{0};
  std::thread monitor([&] {
    while (!stop) {
      const uint64_t r = s.resident_bytes();
      if (r > max_seen) max_seen = r;
      std::this_thread::yield();
    }
  });
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t) + 7);
      for (int i = 0; i < 400; ++i) {
        const int l = static_cast<int>(rng() % 2), e = static_cast<int>(rng() % 8);
        if (rng() % 4 == 0) s.prefetch(static_cast<int32_t>(rng() % 2), static_cast<int32_t>(rng() % 8));
        ExpertStore::Pin p = s.acquire(l, e);
        if (!blob_ok(p)) ++bad;
        if (rng() % 3 == 0) {
          std::optional<ExpertStore::Pin> q = s.try_acquire(static_cast<int32_t>(1 - l), static_cast<int32_t>(rng() % 8));
          if (q && !blob_ok(*q)) ++bad;
        }
        if (rng() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  for (auto& t : ts) t.join();
  stop = true;
  monitor.join();
  CHECK_EQ(bad.load(), 0);
  CHECK(max_seen.load() <= budget);
  CHECK(st->peak_resident_bytes.load() <= budget);
  CHECK(st->evictions.load() > 0);
  CHECK(s.resident_bytes() <= budget);
}

static void test_none_policy() {
  TestBundle b = make_bundle(g_root / "none", {{4, 16, 24}});
  ExpertStore s(load_manifest(b.dir), opts(b.largest(), "none"));
  auto st = s.stats();
  CHECK(!s.cache_enabled());
  for (int i = 0; i < 5; ++i) {
    ExpertStore::Pin p = s.acquire(0, i % 4);
    CHECK(blob_ok(p));
  }
  CHECK_EQ(st->misses.load(), uint64_t{5});
  CHECK_EQ(st->reads.load(), uint64_t{5});
  CHECK_EQ(st->hits.load(), uint64_t{0});
  CHECK_EQ(s.resident_bytes(), uint64_t{0});
  CHECK(!s.prefetch(0, 1));
  {
    // budget = one expert: a second concurrent pin must wait
    ExpertStore::Pin p = s.acquire(0, 0);
    CHECK(!s.try_acquire(0, 0).has_value());
    p.wait();  // (a pin released while its read is in flight keeps its bytes until the read completes)
  }
  CHECK_EQ(s.resident_bytes(), uint64_t{0});
}

static void test_checksum_and_io_modes() {
  TestBundle b = make_bundle(g_root / "ck", {{3, 16, 24}});
  for (IoMode io : {IoMode::Direct, IoMode::Buffered, IoMode::Mmap}) {
    ExpertStore s(load_manifest(b.dir), opts(0, "lru", io));
    for (int e = 0; e < 3; ++e) {
      ExpertStore::Pin p = s.acquire(0, e);
      CHECK(blob_ok(p));
      CHECK(std::memcmp(p.wait(), b.w_in[0][static_cast<size_t>(e)].data(), 64) == 0);
    }
    std::lock_guard<std::mutex> lk(s.stats()->mu);
    CHECK(s.stats()->io_mode == (io == IoMode::Mmap ? "mmap" : io == IoMode::Direct ? "direct" : "buffered"));
    if (io == IoMode::Direct) CHECK(s.stats()->direct_io == s.stats()->io_note.empty());
  }
  // corrupt expert 1 (a byte inside its meaningful range)
  {
    const uint64_t off = b.manifest["experts"][1]["offset"].get<uint64_t>() + 10;
    std::fstream f(b.dir / "experts.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(off));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(off));
    f.write(&c, 1);
  }
  ExpertStore s(load_manifest(b.dir), opts(0));
  EXPECT_ERROR(s.acquire(0, 1).wait(), "experts.bin", "layer 0 expert 1", "checksum mismatch", "expected",
               b.manifest["experts"][1]["checksum"].get<std::string>());
  EXPECT_ERROR(s.acquire(0, 1).wait(), "checksum mismatch");  // retried, fails again: never wrong numbers
  CHECK(!s.is_resident(0, 1));
  CHECK_EQ(s.resident_bytes(), uint64_t{0});
  {
    ExpertStore::Pin p = s.acquire(0, 0);
    CHECK(blob_ok(p));
  }
  StoreOptions nv = opts(0);
  nv.verify_checksums = false;
  ExpertStore s2(load_manifest(b.dir), nv);
  ExpertStore::Pin p = s2.acquire(0, 1);
  CHECK(!blob_ok(p));  // not verified: the caller asked for it
}

static void silu_ref(const TestBundle& b, int l, const std::vector<float>& X, const std::vector<int64_t>& idx,
                     const std::vector<float>& w, int64_t T, int64_t K, std::vector<double>& Y) {
  const auto& L = b.layers[static_cast<size_t>(l)];
  const int64_t H = L.hidden, I = L.inter;
  Y.assign(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = idx[static_cast<size_t>(t * K + k)];
      if (e < 0) continue;
      const auto& wi = b.w_in[static_cast<size_t>(l)][static_cast<size_t>(e)];
      const auto& wo = b.w_out[static_cast<size_t>(l)][static_cast<size_t>(e)];
      std::vector<double> h(static_cast<size_t>(I));
      for (int64_t j = 0; j < I; ++j) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += static_cast<double>(wi[static_cast<size_t>(j * H + c)]) * X[static_cast<size_t>(t * H + c)];
          u += static_cast<double>(wi[static_cast<size_t>((I + j) * H + c)]) * X[static_cast<size_t>(t * H + c)];
        }
        h[static_cast<size_t>(j)] = g / (1.0 + std::exp(-g)) * u;
      }
      for (int64_t r = 0; r < H; ++r) {
        double y = 0;
        for (int64_t j = 0; j < I; ++j) y += static_cast<double>(wo[static_cast<size_t>(r * I + j)]) * h[static_cast<size_t>(j)];
        Y[static_cast<size_t>(t * H + r)] += w[static_cast<size_t>(t * K + k)] * y;
      }
    }
  }
}

static void test_run_moe() {
  TestBundle b = make_bundle(g_root / "moe", {{8, 32, 48}});
  const int64_t H = 32, K = 2, T = 17;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> X(static_cast<size_t>(T * H)), w(static_cast<size_t>(T * K));
  std::vector<int64_t> idx(static_cast<size_t>(T * K));
  for (auto& x : X) x = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    idx[static_cast<size_t>(t * K)] = static_cast<int64_t>(rng() % 8);
    idx[static_cast<size_t>(t * K + 1)] = t == 3 ? -1 : (idx[static_cast<size_t>(t * K)] + 1 + static_cast<int64_t>(rng() % 7)) % 8;
    w[static_cast<size_t>(t * K)] = 0.7f;
    w[static_cast<size_t>(t * K + 1)] = 0.3f;
  }
  std::vector<double> ref;
  silu_ref(b, 0, X, idx, w, T, K, ref);
  MoeAttrs a;
  a.layer = 0;
  a.num_experts = 8;
  a.top_k = K;
  std::vector<float> Y1(X.size()), Y2(X.size());
  {
    ExpertStore s(load_manifest(b.dir), opts(0));
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y1.data(), serial_parallel_for());
  }
  {
    ExpertStore s(load_manifest(b.dir), opts(2 * b.largest()));  // tight budget: same bits
    // a "parallel" for that runs in reverse order: results must not depend on scheduling
    ParallelFor rev = [](size_t n, const std::function<void(size_t)>& fn) {
      for (size_t i = n; i-- > 0;) fn(i);
    };
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y2.data(), rev);
    run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y2.data(), rev);
    CHECK(s.stats()->peak_resident_bytes.load() <= 2 * b.largest());
  }
  double maxerr = 0, maxref = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    maxerr = std::max(maxerr, std::abs(Y1[i] - ref[i]));
    maxref = std::max(maxref, std::abs(ref[i]));
    CHECK(Y1[i] == Y2[i]);
  }
  CHECK(maxerr <= 1e-5 * maxref);
  ExpertStore s(load_manifest(b.dir), opts(0));
  idx[5] = 8;
  EXPECT_ERROR(run_moe(s, a, X.data(), idx.data(), w.data(), T, H, K, Y1.data(), serial_parallel_for()),
               "manifest.json", "layer 0", "topk_indices[2, 1]", "found 8");
}

static void test_stats_registry() {
  TestBundle b = make_bundle(g_root / "reg", {{2, 16, 24}});
  StoreOptions o = opts(0);
  o.store_id = "registry-test";
  {
    ExpertStore s(load_manifest(b.dir), o);
    ExpertStore::Pin p = s.acquire(0, 1);
    p.wait();
  }
  auto st = stats_find("registry-test");
  CHECK(st != nullptr);
  CHECK(st && st->misses.load() == 1 && !st->attached.load() && st->resident_bytes.load() == 0);
  CHECK(st && st->to_json().find("\"misses\":1") != std::string::npos);
  st->reset();
  CHECK_EQ(st->misses.load(), uint64_t{0});
  CHECK(stats_find("no-such-store") == nullptr);
}

static void test_throttle_ranges() {
  // Out-of-range settings are rejected at parse time, naming the key, the range and the value.
  EXPECT_ERROR(parse_throttle_latency_us("1e300"), "edgemoe.throttle_latency_us", "1e9", "found '1e300'");
  EXPECT_ERROR(parse_throttle_latency_us("1000000001"), "edgemoe.throttle_latency_us", "found '1000000001'");
  EXPECT_ERROR(parse_throttle_bw("1e-12"), "edgemoe.throttle_bw", "[1, 1e13]", "found '1e-12'");
  EXPECT_ERROR(parse_throttle_bw("0.5"), "edgemoe.throttle_bw", "found '0.5'");
  EXPECT_ERROR(parse_throttle_bw("99999TB"), "edgemoe.throttle_bw", "found '99999TB'");
  CHECK(parse_throttle_latency_us("1e9") == 1e9);
  CHECK(parse_throttle_bw("1") == 1.0);
  CHECK(parse_throttle_bw("10TB") == 1e13);
  CHECK(parse_throttle_bw("0") == 0.0);
  EXPECT_ERROR(validate_throttle(0, 1e300), "edgemoe.throttle_latency_us", "found 1e+300");
  EXPECT_ERROR(validate_throttle(1e-12, 0), "edgemoe.throttle_bw", "found 1e-12");
  TestBundle b = make_bundle(g_root / "thr", {{2, 16, 24}});
  StoreOptions o = opts(0);
  o.throttle_latency_us = 1e300;
  EXPECT_ERROR(ExpertStore(load_manifest(b.dir), o), "edgemoe.throttle_latency_us");

  // The emulated timeline saturates instead of converting out-of-range doubles (UBSan) or overflowing.
  using Clock = std::chrono::steady_clock;
  const auto now = Clock::now();
  Throttle slow(kMinThrottleBw, kMaxThrottleLatencyUs);
  CHECK(slow.complete_at(now, std::numeric_limits<uint64_t>::max()) == Clock::time_point::max());
  CHECK(slow.complete_at(now, 1) == Clock::time_point::max());  // the device stays busy "forever"
  Throttle absurd(1e-300, 1e300);  // not constructible through the options, still no UB
  CHECK(absurd.complete_at(now, 4096) == Clock::time_point::max());
  Throttle ok(1e9, 10);
  const auto t = ok.complete_at(now, 1000);  // 10 us + 1 us
  CHECK(t - now == std::chrono::microseconds(11));
}

static void test_throttle_close_does_not_hang() {
  // A huge (in-range) emulated latency: closing the store interrupts the sleeping I/O threads.
  TestBundle b = make_bundle(g_root / "thrclose", {{4, 16, 24}});
  for (const char* policy : {"lru", "none"}) {
    StoreOptions o = opts(0, policy);
    o.throttle_latency_us = kMaxThrottleLatencyUs;  // 1000 s per read
    o.throttle_bw = kMinThrottleBw;                 // and 1 byte/s
    const auto t0 = std::chrono::steady_clock::now();
    {
      ExpertStore s(load_manifest(b.dir), o);
      s.prefetch(0, 0);
      ExpertStore::Pin p = s.acquire(0, 1);
      CHECK(!p.ready());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // both reads are now sleeping
      p.release();
    }
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20));
  }
}

static void test_oom_rollback() {
  // Every allocation of acquire()/prefetch() in turn fails: each failure must leave the store as it was (no
  // lost reserved bytes, no Loading entry that is never read), so every expert stays usable afterwards.
  TestBundle b = make_bundle(g_root / "oom", {{6, 16, 24}});
  const uint64_t L = b.length(0, 0);
  ExpertStore s(load_manifest(b.dir), opts(2 * L));
  auto consistent = [&] {
    uint64_t sum = 0;
    for (int e = 0; e < 6; ++e)
      if (s.is_resident(0, e)) sum += b.length(0, e);
    return sum == s.resident_bytes();
  };
  int injected = 0;
  for (int round = 0; round < 12; ++round) {
    const int e = round % 6;  // cycles through 6 experts with room for 2: most requests evict
    const bool prefetch = round % 3 == 2;
    for (long n = 1;; ++n) {
      bool threw = false;
      t_fail_countdown = n;
      try {
        if (prefetch) {
          s.prefetch(0, e);
          t_fail_countdown = -1;
        } else {
          ExpertStore::Pin p = s.acquire(0, e);
          t_fail_countdown = -1;
          CHECK(blob_ok(p));
        }
      } catch (const std::bad_alloc&) {
        threw = true;
        ++injected;
      }
      t_fail_countdown = -1;
      CHECK(consistent());
      if (!threw) break;
    }
  }
  CHECK(injected >= 12);
  for (int e = 0; e < 6; ++e) {
    ExpertStore::Pin p = s.acquire(0, e);
    CHECK(blob_ok(p));
  }
  CHECK(consistent());
  CHECK(s.resident_bytes() <= 2 * L);
}

static size_t open_fds() {
  size_t n = 0;
  for (const auto& de : fs::directory_iterator("/proc/self/fd")) n += de.exists() ? 1 : 0;
  return n;
}

static void test_blob_reader_errors() {
  // A store "file" that opens but is not a regular file (a directory): an error naming it, no fd leaked. The
  // descriptor is checked (fstat) before any read or mapping, in every mode.
  const fs::path d = g_root / "not-a-file";
  fs::create_directories(d);
  const size_t before = open_fds();
  for (IoMode io : {IoMode::Direct, IoMode::Buffered, IoMode::Mmap})
    EXPECT_ERROR(open_blob_source(d.string(), 8192, io), d.string(), "store.file", "expected a regular file",
                 "found a directory");
  CHECK_EQ(open_fds(), before);
}

static void test_read_error_names_the_store_once() {
  // A read that fails on a running store (here: the file truncated after the store opened it) is one
  // message in the Errors format, "<file>: layer L expert E: blob bytes: ...". The store's path used to be
  // in the blob's name too, so every read error named the file twice (found with tests/test_io_faults.py).
  for (IoMode io : {IoMode::Direct, IoMode::Buffered}) {
    TestBundle b = make_bundle(g_root / (std::string("rderr-") + io_mode_name(io)), {{3, 16, 24}});
    ExpertStore s(load_manifest(b.dir), opts(0, "lru", io));
    const fs::path store = b.dir / "experts.bin";
    fs::resize_file(store, 0);
    const auto& rec = b.manifest["experts"][1];
    const std::string want = store.string() + ": layer 0 expert 1: blob bytes: truncated store (unexpected end of "
                             "file) (expected " + std::to_string(rec["length"].get<uint64_t>()) +
                             " bytes at offset " + std::to_string(rec["offset"].get<uint64_t>()) + ", found 0 bytes)";
    std::string got;
    try {
      s.acquire(0, 1).wait();
    } catch (const std::exception& ex) {
      got = ex.what();
    }
    if (got != want) std::fprintf(stderr, "  got:  %s\n  want: %s\n", got.c_str(), want.c_str());
    CHECK(got == want);
    CHECK(!s.is_resident(0, 1));
    CHECK_EQ(s.resident_bytes(), uint64_t{0});
  }
}

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"manifest_errors", test_manifest_errors},
      {"parse_budget", test_parse_budget},
      {"budget_below_largest", test_budget_below_largest},
      {"lru_order_and_pins", test_lru_order_and_pins},
      {"inflight_dedup_and_prefetch", test_inflight_dedup_and_prefetch},
      {"concurrent_budget", test_concurrent_budget},
      {"none_policy", test_none_policy},
      {"checksum_and_io_modes", test_checksum_and_io_modes},
      {"run_moe", test_run_moe},
      {"stats_registry", test_stats_registry},
      {"throttle_ranges", test_throttle_ranges},
      {"throttle_close_does_not_hang", test_throttle_close_does_not_hang},
      {"oom_rollback", test_oom_rollback},
      {"blob_reader_errors", test_blob_reader_errors},
      {"read_error_names_the_store_once", test_read_error_names_the_store_once},
  };
  return run_tests("test_store", tests);
}
