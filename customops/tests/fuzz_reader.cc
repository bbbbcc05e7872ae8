// Fuzz driver of the native reader, without ONNX Runtime (tests/fuzz/run.py, `make fuzz`): built in the release
// build and in the ASan/UBSan build (build/asan), not a ctest. For every case directory it does what the engine
// does when a session starts and runs, minus the compute:
//   stage "manifest": edgemoe::load_manifest(dir)
//   stage "store":    ExpertStore(manifest, options)   (open_blob_source: the store descriptor, its size)
//   stage "verify":   acquire + wait every (layer, expert) record (read + xxh3_64 verified), view its tensors
// and prints one JSON line per case:
//   {"case": DIR, "ok": bool, "stage": "manifest"|"store"|"verify"|null, "error": MSG|null,
//    "kind": "error"|"bad_alloc"|"exception"|null, "error_utf8": bool, "records": N, "peak_rss_kib": K,
//    "rss_growth_kib": G}
// `kind` "error" is an edgemoe::Error (the only kind the library may throw for a bad bundle); `error_utf8` says
// whether the message is well-formed UTF-8 (it is printed with invalid bytes replaced); `peak_rss_kib` is the
// process's peak RSS during the case (VmHWM after resetting it through /proc/self/clear_refs; -1 if unknown)
// and `rss_growth_kib` that peak minus the RSS before the case.
//
// Usage: fuzz_reader [--io direct|buffered|mmap] (DIR... | --list FILE | -)
//   --list FILE  one case directory per line;  -  read case lines from stdin, answering each before reading the
//   next (the lockstep protocol of tests/fuzz/run.py). A case line is `DIR` or `DIR<TAB>IO`.
//   --progress FILE  rewrites FILE with the case directory before each case (a crash names its case).

#include <cstdio>
#include <fstream>
#include <iostream>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "edgemoe/blob_source.h"
#include "edgemoe/manifest.h"
#include "edgemoe/store.h"

namespace {

using json = nlohmann::json;
using edgemoe::ExpertStore;
using edgemoe::IoMode;

// Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, at most U+10FFFF).
bool utf8_valid(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      const unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (d < l || d > h) return false;
    }
    i += len;
  }
  return true;
}

void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (f) f << "5";
}

// A field of /proc/self/status in KiB ("VmHWM:", "VmRSS:"), -1 if unknown.
long status_kib(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
  }
  return -1;
}

json run_case(const std::string& dir, IoMode io) {
  json out = {{"case", dir}, {"ok", false}, {"stage", nullptr}, {"error", nullptr}, {"kind", nullptr},
              {"error_utf8", true}, {"records", 0}};
  std::string stage = "manifest";
  auto fail = [&](const char* kind, const std::string& msg) {
    out["stage"] = stage;
    out["kind"] = kind;
    out["error_utf8"] = utf8_valid(msg);
    out["error"] = msg;
  };
  const long rss0 = status_kib("VmRSS:");
  reset_peak_rss();
  try {
    edgemoe::Manifest m = edgemoe::load_manifest(dir);
    stage = "store";
    edgemoe::StoreOptions o;
    o.io_mode = io;
    o.io_threads = 1;
    o.store_id = "fuzz_reader";  // one id per process: the stats registry does not grow with the cases
    ExpertStore store(std::move(m), o);
    stage = "verify";
    const edgemoe::Manifest& mm = store.manifest();
    size_t records = 0;
    unsigned sum = 0;
    for (size_t l = 0; l < mm.layers.size(); ++l) {
      for (size_t e = 0; e < mm.experts[l].size(); ++e) {
        ExpertStore::Pin p = store.acquire(static_cast<int32_t>(l), static_cast<int32_t>(e));
        const uint8_t* blob = p.wait();
        const edgemoe::ExpertView v = edgemoe::make_expert_view(p.record(), blob);
        // Touch the first and last byte of each tensor: ASan checks they lie inside the blob buffer.
        for (const edgemoe::TensorRef* t : {&p.record().w_in, &p.record().w_out, &p.record().w_in_scales,
                                            &p.record().w_in_zeros, &p.record().w_out_scales,
                                            &p.record().w_out_zeros, &p.record().b_in, &p.record().b_out}) {
          if (t->present && t->nbytes > 0) sum += blob[t->offset] + blob[t->offset + t->nbytes - 1];
        }
        sum += v.w_in.data != nullptr;
        ++records;
      }
    }
    out["records"] = records;
    out["ok"] = true;
    out["touched"] = sum % 2;  // keeps the reads observable
  } catch (const edgemoe::Error& ex) {
    fail("error", ex.what());
  } catch (const std::bad_alloc&) {
    fail("bad_alloc", "std::bad_alloc");
  } catch (const std::exception& ex) {
    fail("exception", ex.what());
  }
  const long hwm = status_kib("VmHWM:");
  out["peak_rss_kib"] = hwm;
  out["rss_growth_kib"] = hwm >= 0 && rss0 >= 0 ? hwm - rss0 : -1;
  return out;
}

int usage() {
  std::fprintf(stderr, "usage: fuzz_reader [--io direct|buffered|mmap] [--progress FILE] (DIR... | --list FILE | -)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  IoMode io = IoMode::Buffered;
  std::string list, progress;
  bool from_stdin = false;
  std::vector<std::string> dirs;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--io" && i + 1 < argc) {
        io = edgemoe::parse_io_mode(argv[++i]);
      } else if (a == "--list" && i + 1 < argc) {
        list = argv[++i];
      } else if (a == "--progress" && i + 1 < argc) {
        progress = argv[++i];
      } else if (a == "-") {
        from_stdin = true;
      } else if (!a.empty() && a[0] == '-') {
        return usage();
      } else {
        dirs.push_back(a);
      }
    }
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "fuzz_reader: %s\n", ex.what());
    return 2;
  }
  if (!list.empty()) {
    std::ifstream f(list);
    if (!f) {
      std::fprintf(stderr, "fuzz_reader: cannot read %s\n", list.c_str());
      return 2;
    }
    for (std::string line; std::getline(f, line);)
      if (!line.empty()) dirs.push_back(line);
  }
  if (dirs.empty() && !from_stdin) return usage();
  auto one = [&](const std::string& line) {
    std::string dir = line;
    IoMode mode = io;
    const size_t tab = line.find('\t');
    if (tab != std::string::npos) {
      dir = line.substr(0, tab);
      mode = edgemoe::parse_io_mode(line.substr(tab + 1));
    }
    if (!progress.empty()) std::ofstream(progress, std::ios::trunc) << dir << "\n";
    const json r = run_case(dir, mode);
    std::cout << r.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
  };
  for (const auto& d : dirs) one(d);
  if (from_stdin) {
    for (std::string line; std::getline(std::cin, line);)
      if (!line.empty()) one(line);
  }
  return 0;
}
