// Hardening of the native reader and store (issue 15): no crash, hang or silent corruption from any bundle or
// device. Each test is the regression test of one defect (docs/reliability.md).
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <thread>

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
  // EINTR is retried, but a signal storm that never lets a read through fails it (it used to spin forever:
  // found with the LD_PRELOAD fault shim, tests/test_io_faults.py).
  calls = 0;
  PreadFn storm = [&](uint8_t*, size_t, uint64_t) -> ssize_t {
    ++calls;
    errno = EINTR;
    return -1;
  };
  EXPECT_ERROR(read_fully(storm, "store", "layer 1 expert 2", base, length, dst.data(), A), "layer 1 expert 2",
               "read interrupted (EINTR 1000 times in a row)");
  CHECK_EQ(calls, 1001);
  calls = 0;  // interrupts between successful reads do not add up
  PreadFn flaky = [&](uint8_t* d, size_t n, uint64_t off) -> ssize_t {
    if (calls++ % 600 != 599) {
      errno = EINTR;
      return -1;
    }
    const size_t k = std::min<size_t>(n, A);
    std::memcpy(d, file.data() + off, k);
    return static_cast<ssize_t>(k);
  };
  read_fully(flaky, "store", "blob", base, length, dst.data(), A);
  CHECK(std::memcmp(dst.data(), file.data() + base, length) == 0);
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

// Defect 7: what the Python reader refuses, this one refuses too (and what it accepts, this one accepts).
static void test_validators_agree() {
  const fs::path d = g_root / "agree";
  TestBundle b = make_bundle(d, {{2, 16, 24}});
  const json good = b.manifest;
  auto with = [&](const std::function<void(json&)>& edit) {
    json m = good;
    edit(m);
    write_text(d / "manifest.json", m.dump());
  };
  // Paths: one spelling per file; every component non-empty, not '.' or '..'.
  for (const char* bad : {"experts.bin/.", "./experts.bin", "experts.bin/", "a//experts.bin", "a/./b", "a/../b"})
    CHECK(!check_relative_path(bad).empty());
  CHECK(check_relative_path("store/experts.bin").empty());
  with([](json& m) { m["store"]["file"] = "experts.bin/."; });
  EXPECT_ERROR(load_manifest(d), "store.file", "without empty or '.' components", "'experts.bin/.'");
  // A symlink leaving the bundle (the store, or manifest.json itself) is refused; one inside is followed.
  write_text(d / "manifest.json", good.dump());
  const fs::path outside = g_root / "outside.bin";
  fs::remove(outside);
  fs::rename(d / "experts.bin", outside);
  fs::create_symlink(outside, d / "experts.bin");
  EXPECT_ERROR(load_manifest(d), "store.file", "expected a path inside the bundle", outside.string());
  fs::remove(d / "experts.bin");
  fs::create_directory(d / "data");
  fs::rename(outside, d / "data" / "store.bin");
  fs::create_symlink("data/store.bin", d / "experts.bin");
  CHECK_EQ(load_manifest(d).record(0, 1).layer, 0);  // inside: fine
  fs::rename(d / "manifest.json", g_root / "outside.json");
  fs::create_symlink(g_root / "outside.json", d / "manifest.json");
  EXPECT_ERROR(load_manifest(d), "manifest.json", "manifest", "expected a path inside the bundle");
  fs::remove(d / "manifest.json");
  fs::rename(g_root / "outside.json", d / "manifest.json");
  // A leading UTF-8 byte-order mark is ignored (RFC 8259 allows it; the Python reader strips it too).
  write_text(d / "manifest.json", "\xEF\xBB\xBF" + good.dump());
  CHECK_EQ(load_manifest(d).num_records(), size_t{2});
  // An unpaired surrogate escape is not valid JSON text.
  std::string text = good.dump();
  const std::string fam = "\"activation\":\"silu\"";
  CHECK(text.find(fam) != std::string::npos);
  write_text(d / "manifest.json", text.replace(text.find(fam), fam.size(), "\"activation\":\"\\ud800silu\""));
  EXPECT_ERROR(load_manifest(d), "manifest.json", "not valid JSON", "surrogate");
  // The caps Python applies too (format.py READER_LIMITS; tests/test_bundle.py checks the tables agree).
  with([](json& m) { m["layers"][0]["hidden"] = kMaxDim + 1; });
  EXPECT_ERROR(load_manifest(d), "layers[0].hidden", "expected <= 2^24");
  with([](json& m) { m["layers"][0]["num_experts"] = kMaxExperts + 1; });
  EXPECT_ERROR(load_manifest(d), "layers[0].num_experts", "expected <= 2^20");
  CHECK_EQ(reader_limits().size(), size_t{6});
  CHECK(std::string(reader_limits()[0].name) == "max_manifest_bytes");
  write_text(d / "manifest.json", good.dump());
}

// Defect 8: io=mmap on a store truncated while mapped raised SIGBUS in the copy (2 of 15 runs). The copy is
// a process_vm_readv now: a page past the new end of the file is an EFAULT, reported as a read error.
static void test_mmap_truncated_while_mapped() {
  const fs::path d = g_root / "mmap_trunc";
  TestBundle b = make_bundle(d, {{4, 64, 96}});
  const fs::path store = d / "experts.bin";
  const uint64_t size = fs::file_size(store);
  const uint8_t one = 1;
  uint8_t probe = 0;
  const bool have_pvr = copy_from_own_memory(&probe, &one, 1) == 1;
  if (!have_pvr) {  // qemu-user (the aarch64 lane) answers ENOSYS: the source reads through its descriptor
    std::printf("  process_vm_readv unavailable (%s): checking the descriptor fallback only\n", std::strerror(errno));
    CHECK(open_blob_source(store.string(), size, IoMode::Mmap)->note().find("process_vm_readv unavailable") !=
          std::string::npos);
  }
  if (have_pvr) {  // the primitive: a mapping past the end of a truncated file
    UniqueFd fd(::open(store.c_str(), O_RDONLY));
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
    CHECK(p != MAP_FAILED);
    std::vector<uint8_t> keep(size), dst(size);
    CHECK_EQ(copy_from_own_memory(keep.data(), static_cast<const uint8_t*>(p), size), static_cast<ssize_t>(size));
    CHECK(::truncate(store.c_str(), 4096) == 0);
    const ssize_t got = copy_from_own_memory(dst.data(), static_cast<const uint8_t*>(p), size);
    CHECK_EQ(got, ssize_t{4096});  // the first page, then EFAULT (a memcpy here would have raised SIGBUS)
    CHECK(std::memcmp(dst.data(), keep.data(), 4096) == 0);
    CHECK_EQ(copy_from_own_memory(dst.data(), static_cast<const uint8_t*>(p) + 8192, 4096), ssize_t{-1});
    CHECK_EQ(errno, EFAULT);
    ::munmap(p, size);
    std::ofstream(store, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(keep.data()),
                                                                   static_cast<std::streamsize>(size));
  }
  // Through the store, while another thread shrinks and rewrites the file: every acquire gives a blob whose
  // checksum is right (a read that raced the rewrite may copy a torn page: the checksum refuses it) or fails
  // naming the expert ("truncated store" or "checksum mismatch"); the process survives.
  const std::vector<char> bytes = [&] {
    std::ifstream f(store, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
  }();
  ExpertStore st(load_manifest(d), opts(b.largest(), "none", IoMode::Mmap));  // every acquire reads
  std::atomic<bool> stop{false};
  std::thread shrinker([&] {
    while (!stop.load()) {
      if (::truncate(store.c_str(), 4096) != 0) break;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      std::ofstream(store, std::ios::binary | std::ios::trunc).write(bytes.data(),
                                                                     static_cast<std::streamsize>(bytes.size()));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  int ok = 0, refused = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(400);
  for (int64_t e = 0; std::chrono::steady_clock::now() < until; e = (e + 1) % 4) {
    try {
      ExpertStore::Pin pin = st.acquire(0, e);
      CHECK(blob_ok(pin));  // never silently wrong
      ++ok;
    } catch (const Error& ex) {
      const std::string what = ex.what();
      CHECK(what.find("layer 0 expert " + std::to_string(e)) != std::string::npos);
      // "could not be read": the page failed while the file was short, but it had grown back by the fstat after
      CHECK(what.find("truncated store") != std::string::npos || what.find("checksum mismatch") != std::string::npos ||
            what.find("a page of the mapping could not be read") != std::string::npos);
      ++refused;
    }
  }
  stop = true;
  shrinker.join();
  std::printf("  mmap under truncation: %d acquires right, %d refused\n", ok, refused);
  CHECK(refused > 0);
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
      {"validators_agree", test_validators_agree},
      {"mmap_truncated_while_mapped", test_mmap_truncated_while_mapped},
      {"bench_verify_cost", bench_verify_cost},
  };
  return run_tests("test_reader", tests);
}
