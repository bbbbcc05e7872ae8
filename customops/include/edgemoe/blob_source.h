// Where blob bytes come from: a minimal, thread-safe `read(offset, length, dst)` over the store file, one
// implementation per I/O mode (docs/op-contract.md, "I/O modes"). The throttle (throttle.h) is a decorator
// around any source.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "edgemoe/fd.h"

namespace edgemoe {

enum class IoMode : uint8_t { Direct, Buffered, Mmap };
IoMode parse_io_mode(const std::string& s);  // throws edgemoe::Error
const char* io_mode_name(IoMode m);

class BlobSource {
 public:
  virtual ~BlobSource() = default;
  // Reads [offset, offset + length) into dst (page-aligned, `length` bytes; offset and length multiples of
  // 4096). `what` names the blob in error messages. Throws edgemoe::Error. Safe to call concurrently.
  virtual void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) = 0;
  // The mode in effect (direct falls back to buffered where O_DIRECT is refused).
  virtual IoMode mode() const = 0;
  // Why the mode in effect differs from the one asked for ("" if it does not).
  virtual const std::string& note() const = 0;
  // Asks a blocked read to give up (store closing); a no-op for sources that never block long.
  virtual void interrupt() noexcept {}
};

// Opens `path` (`size` bytes, already validated) for `mode`. Throws edgemoe::Error naming the file.
std::unique_ptr<BlobSource> open_blob_source(const std::string& path, uint64_t size, IoMode mode);

}  // namespace edgemoe
