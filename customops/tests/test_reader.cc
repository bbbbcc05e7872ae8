// Hardening of the native reader and store (issue 15): no crash, hang or silent corruption from any bundle or
// device. Each test is the regression test of one defect (docs/reliability.md).
#include <sys/stat.h>

#include <future>

#include "store_testing.h"

namespace {

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(s.data(), static_cast<std::streamsize>(s.size()));
}

// Runs f on another thread; if it has not returned after `seconds`, reports a hang and calls unblock() (which
// should make f return) until it does.
void expect_returns(const std::function<void()>& f, double seconds, const std::function<void()>& unblock,
                    int line) {
  auto fut = std::async(std::launch::async, f);
  if (fut.wait_for(std::chrono::duration<double>(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "line %d: hung for %.0f s\n", line, seconds);
    ++g_failures;
    while (fut.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready) unblock();
  }
  fut.get();
}

void flip_byte(const fs::path& p, uint64_t off) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(off));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(&c, 1);
}

}  // namespace

// Defect 1: a value nested 70,000+ levels deep (~150 KB) overflowed the stack when a message dumped it.
static void test_deep_nesting() {
  const fs::path d = g_root / "deep";
  TestBundle b = make_bundle(d, {{2, 16, 24}});
  const std::string good = b.manifest.dump();
  const size_t depth = 100000;
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  // format_version is dumped into the "unsupported format version" message.
  std::string text = good;
  const std::string fv = "\"format_version\":1";
  CHECK(text.find(fv) != std::string::npos);
  text.replace(text.find(fv), fv.size(), "\"format_version\":" + deep);
  write_text(d / "manifest.json", text);
  EXPECT_ERROR(load_manifest(d), "manifest.json", "nested too deeply", "at most 64 levels");
  // Brackets inside strings do not count; a depth within the limit is fine.
  CHECK(check_json_nesting("{\"a\": \"[[[[[[[[\\\"[[[[\", \"b\": [[1]]}", 3).empty());
  CHECK(!check_json_nesting("[[[[1]]]]", 3).empty());
  CHECK(check_json_nesting(std::string(64, '[') + std::string(64, ']')).empty());
  // The message helper itself is bounded and iterative, whatever the value (built without recursion).
  json v = json::array();
  for (size_t i = 0; i < depth; ++i) {
    json outer = json::array();
    outer.push_back(std::move(v));
    v = std::move(outer);
  }
  const std::string s = json_summary(v);
  CHECK(s.size() <= 80);
  CHECK(s.rfind("[[[[", 0) == 0);
  CHECK_EQ(json_summary(json(std::string(8 << 20, 'x'))).size(), size_t{80});
  CHECK(json_summary(json::parse("{\"a\": [1, 2], \"b\": null}")) == "{\"a\": [1, 2], \"b\": null}");
  CHECK(json_summary(json("caf\xc3")) == "\"caf\xef\xbf\xbd\"");  // invalid UTF-8: replaced, no throw
}

// Defect 3 (message part): a huge field made a message as large as the field.
static void test_huge_fields_bounded_messages() {
  const fs::path d = g_root / "huge";
  const std::string big(4 << 20, 'a');
  auto msg_of = [&](const std::function<void(TestBundle&)>& edit) {
    TestBundle b = make_bundle(d, {{2, 16, 24}});
    edit(b);
    b.write_manifest();
    try {
      load_manifest(d);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string m = msg_of([&](TestBundle& b) { b.manifest["store"]["file"] = big; });
  CHECK(m.find("store.file") != std::string::npos && m.find("at most 4096 bytes") != std::string::npos);
  CHECK(m.size() < 8192);
  m = msg_of([&](TestBundle& b) { b.manifest["experts"][1]["checksum"] = big; });
  CHECK(m.find("layer 0 expert 1") != std::string::npos && m.find("checksum") != std::string::npos);
  CHECK(m.size() < 8192);
  m = msg_of([&](TestBundle& b) { b.manifest["experts"][0]["format"]["dtype"] = big; });
  CHECK(m.find("unknown dtype") != std::string::npos && m.size() < 8192);
  m = msg_of([&](TestBundle& b) { b.manifest["layers"][0]["activation"] = big; });
  CHECK(m.find("activation") != std::string::npos && m.size() < 8192);
  m = msg_of([&](TestBundle& b) { b.manifest["format"] = json::array({big, big}); });
  CHECK(m.find("'edgemoe-bundle'") != std::string::npos && m.size() < 8192);
  TestBundle b = make_bundle(d, {{2, 16, 24}});
  EXPECT_ERROR(load_manifest(d, std::string(100000, 'm')), "manifest (attribute)", "at most 4096 bytes");
  CHECK(error_message(big, 0, 1, big, big, big, big).size() < 4096 + 256 + 5 * 512 + 64);
}

// Defect 3: tables sized from num_experts (accepted up to 2^20) before the records were checked: a small
// manifest cost ~475 MiB per layer.
static void test_num_experts_does_not_size_tables() {
  const fs::path d = g_root / "many";
  TestBundle b = make_bundle(d, {{4, 16, 24}});
  json layer = b.manifest["layers"][0];
  b.manifest["layers"] = json::array();
  for (int l = 0; l < 4; ++l) {
    layer["layer"] = l;
    layer["num_experts"] = 1 << 20;
    b.manifest["layers"].push_back(layer);
  }
  b.write_manifest();
  CHECK(fs::file_size(d / "manifest.json") < 64 * 1024);
  t_largest_alloc = 0;
  EXPECT_ERROR(load_manifest(d), "layer 0 expert 4", "missing expert record");
  const size_t largest = t_largest_alloc;
  if (largest > (size_t{4} << 20)) {
    std::fprintf(stderr, "load_manifest made an allocation of %zu bytes for a %ju-byte manifest\n", largest,
                 static_cast<uintmax_t>(fs::file_size(d / "manifest.json")));
    ++g_failures;
  }
  // Complete layers after an incomplete one: the first missing record of the lowest layer is named.
  TestBundle c = make_bundle(d, {{3, 16, 24}, {2, 16, 24}});
  c.manifest["experts"].erase(4);  // layer 1 expert 1
  c.manifest["experts"].erase(0);  // layer 0 expert 0
  c.write_manifest();
  EXPECT_ERROR(load_manifest(d), "layer 0 expert 0", "missing expert record");
  // A complete bundle still loads, with the same indices.
  TestBundle ok = make_bundle(d, {{3, 16, 24}, {2, 16, 24}});
  Manifest m = load_manifest(d);
  CHECK_EQ(m.num_records(), size_t{5});
  CHECK_EQ(m.record_index(1, 1), size_t{4});
  CHECK_EQ(m.record(1, 0).expert, 0);
}

// Defect 2: the store was stat()ed, then opened by path: a FIFO put there in between made open() block.
static void test_fifo_never_hangs() {
  const fs::path d = g_root / "fifo";
  fs::create_directories(d);
  const fs::path p = d / "experts.bin";
  for (IoMode io : {IoMode::Direct, IoMode::Buffered, IoMode::Mmap}) {
    fs::remove(p);
    CHECK(::mkfifo(p.c_str(), 0600) == 0);
    expect_returns([&] { EXPECT_ERROR(open_blob_source(p.string(), 8192, io), p.string(), "store.file",
                                      "expected a regular file", "found a FIFO"); },
                   10.0, [&] {
                     UniqueFd w(::open(p.c_str(), O_WRONLY | O_NONBLOCK));
                     std::this_thread::sleep_for(std::chrono::milliseconds(50));
                   }, __LINE__);
  }
  // The manifest: same (it is read through one descriptor opened without blocking).
  TestBundle b = make_bundle(d, {{2, 16, 24}});
  fs::remove(d / "manifest.json");
  CHECK(::mkfifo((d / "manifest.json").c_str(), 0600) == 0);
  expect_returns([&] { EXPECT_ERROR(load_manifest(d), "manifest.json", "expected a regular file"); }, 10.0,
                 [&] {
                   UniqueFd w(::open((d / "manifest.json").c_str(), O_WRONLY | O_NONBLOCK));
                   std::this_thread::sleep_for(std::chrono::milliseconds(50));
                 }, __LINE__);
  // A regular file of another size than the manifest's is refused on the descriptor too.
  TestBundle c = make_bundle(d, {{2, 16, 24}});
  const uint64_t size = fs::file_size(d / "experts.bin");
  for (IoMode io : {IoMode::Direct, IoMode::Buffered, IoMode::Mmap}) {
    EXPECT_ERROR(open_blob_source((d / "experts.bin").string(), size + 4096, io), "truncated store",
                 std::to_string(size + 4096));
    auto src = open_blob_source((d / "experts.bin").string(), size, io);  // and the right size opens
    CHECK(src != nullptr);
  }
}

// Defect 5: under O_DIRECT a short read continued at an unaligned offset (EINVAL). The fake pread behaves like
// O_DIRECT: EINVAL unless offset, length and buffer are 4096-aligned; it returns short, unaligned counts.
static void test_short_reads_stay_aligned() {
  const uint64_t A = 4096, length = 16 * A, base = 3 * A;
  std::vector<uint8_t> file(base + length);
  for (size_t i = 0; i < file.size(); ++i) file[i] = static_cast<uint8_t>(i * 131 + 7);
  MappedBuffer dst(length, ArenaOptions{});
  int calls = 0;
  const size_t shorts[] = {1000, 4097, 5000, 12288, 100};
  PreadFn odirect = [&](uint8_t* d, size_t n, uint64_t off) -> ssize_t {
    if (off % A || n % A || reinterpret_cast<uintptr_t>(d) % A) {
      errno = EINVAL;
      return -1;
    }
    const size_t k = std::min(n, shorts[static_cast<size_t>(calls++) % 5]);
    std::memcpy(d, file.data() + off, k);
    return static_cast<ssize_t>(k);
  };
  read_fully(odirect, "store", "blob", base, length, dst.data(), A);
  CHECK(std::memcmp(dst.data(), file.data() + base, length) == 0);
  CHECK(calls > 5);
  // Buffered (align 1): short reads continue where they stopped.
  std::memset(dst.data(), 0, length);
  calls = 0;
  PreadFn buffered = [&](uint8_t* d, size_t n, uint64_t off) -> ssize_t {
    const size_t k = std::min(n, shorts[static_cast<size_t>(calls++) % 5]);
    std::memcpy(d, file.data() + off, k);
    return static_cast<ssize_t>(k);
  };
  read_fully(buffered, "store", "blob", base, length, dst.data(), 1);
  CHECK(std::memcmp(dst.data(), file.data() + base, length) == 0);
  // A device that only ever returns less than a block: an error, not an endless loop.
  calls = 0;
  PreadFn stuck = [&](uint8_t* d, size_t, uint64_t off) -> ssize_t {
    ++calls;
    std::memcpy(d, file.data() + off, 100);
    return 100;
  };
  EXPECT_ERROR(read_fully(stuck, "store", "layer 0 expert 3", base, length, dst.data(), A), "store",
               "layer 0 expert 3", "short reads without progress");
  CHECK(calls < 100);
  PreadFn eof = [](uint8_t*, size_t, uint64_t) -> ssize_t { return 0; };
  EXPECT_ERROR(read_fully(eof, "store", "blob", base, length, dst.data(), A), "unexpected end of file");
  PreadFn eio = [](uint8_t*, size_t, uint64_t) -> ssize_t {
    errno = EIO;
    return -1;
  };
  EXPECT_ERROR(read_fully(eio, "store", "blob", base, length, dst.data(), A), "read failed",
               std::strerror(EIO));
}

// Defect 4: checksums were verified only on a blob's first read: a blob that read back corrupt later was
// used silently and stayed cached.
static void test_verify_every_read() {
  const fs::path d = g_root / "reread";
  for (IoMode io : {IoMode::Direct, IoMode::Buffered, IoMode::Mmap}) {
    for (const char* policy : {"lru", "none"}) {
      TestBundle b = make_bundle(d, {{3, 16, 24}});
      ExpertStore s(load_manifest(b.dir), opts(b.largest(), policy, io));  // room for one expert
      const uint64_t off = b.manifest["experts"][1]["offset"].get<uint64_t>() + 10;
      {
        ExpertStore::Pin p = s.acquire(0, 1);
        CHECK(blob_ok(p));
      }
      {
        ExpertStore::Pin p = s.acquire(0, 0);  // evicts expert 1
        CHECK(blob_ok(p));
      }
      CHECK(!s.is_resident(0, 1));
      flip_byte(d / "experts.bin", off);  // expert 1 now reads back corrupt
      EXPECT_ERROR(s.acquire(0, 1).wait(), "experts.bin", "layer 0 expert 1", "checksum mismatch",
                   b.manifest["experts"][1]["checksum"].get<std::string>());
      CHECK(!s.is_resident(0, 1));  // the bad copy is not cached
      CHECK_EQ(s.resident_bytes(), uint64_t{0});
      flip_byte(d / "experts.bin", off);  // repaired: the next acquire reads again and succeeds
      {
        ExpertStore::Pin p = s.acquire(0, 1);
        CHECK(blob_ok(p));
      }
      CHECK_EQ(s.stats()->checksums_verified.load(), uint64_t{3});  // every successful read was verified
    }
  }
}

// What verifying every read costs: one expert read (buffered and direct: the page cache is dropped after each
// read) vs xxh3_64 of its bytes. Printed, not asserted (timings of a shared machine).
static void bench_verify_cost() {
  const fs::path d = g_root / "bench";
  TestBundle b = make_bundle(d, {{2, 1024, 1024}});  // fp32 experts of 12 MiB
  Manifest m = load_manifest(d);
  const ExpertRecord& rec = m.record(0, 1);
  MappedBuffer buf(rec.length, ArenaOptions{});
  using C = std::chrono::steady_clock;
  const int reps = 5;
  for (IoMode io : {IoMode::Buffered, IoMode::Direct}) {
    auto src = open_blob_source(m.store_path.string(), m.store_size, io);
    double read_s = 1e9, hash_s = 1e9;
    uint64_t h = 0;
    for (int i = 0; i < reps; ++i) {
      auto t0 = C::now();
      src->read(rec.offset, rec.length, buf.data(), "bench");
      auto t1 = C::now();
      h ^= XXH3_64bits(buf.data(), rec.size);
      auto t2 = C::now();
      read_s = std::min(read_s, std::chrono::duration<double>(t1 - t0).count());
      hash_s = std::min(hash_s, std::chrono::duration<double>(t2 - t1).count());
    }
    CHECK(h == (reps % 2 ? rec.checksum : 0));
    std::printf("  verify cost (%s, %.1f MiB expert, best of %d): read %.2f ms (%.2f GB/s), xxh3 %.2f ms "
                "(%.2f GB/s) = +%.1f%%\n",
                src->mode() == IoMode::Direct ? "direct" : "buffered", rec.length / 1048576.0, reps, read_s * 1e3,
                rec.length / read_s / 1e9, hash_s * 1e3, rec.size / hash_s / 1e9, 100.0 * hash_s / read_s);
  }
}

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"deep_nesting", test_deep_nesting},
      {"huge_fields_bounded_messages", test_huge_fields_bounded_messages},
      {"num_experts_does_not_size_tables", test_num_experts_does_not_size_tables},
      {"fifo_never_hangs", test_fifo_never_hangs},
      {"short_reads_stay_aligned", test_short_reads_stay_aligned},
      {"verify_every_read", test_verify_every_read},
      {"bench_verify_cost", bench_verify_cost},
  };
  return run_tests("test_reader", tests);
}
