// Where blob bytes come from: a minimal, thread-safe `read(offset, length, dst)` over the store file, one
// implementation per I/O mode (docs/op-contract.md, "I/O modes"). The throttle (throttle.h) is a decorator
// around any source.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
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

// Opens `path` for `mode`, once, without blocking (O_NONBLOCK, cleared after the checks), and checks the
// descriptor: a regular file of `size` bytes (the manifest's store.size), else edgemoe::Error naming the
// file (a FIFO or device put in the store's place fails at once, never hangs). Only that descriptor is read.
std::unique_ptr<BlobSource> open_blob_source(const std::string& path, uint64_t size, IoMode mode);

// The read loop of the sources: pread_fn(dst, n, offset) (a pread(2)) until [offset, offset + length) is in
// dst, retrying EINTR (up to 1000 in a row) and short reads. With align > 1 (O_DIRECT: offset, length and dst multiples of it) a
// short read that ends mid-block is continued from the start of that block, so every call stays aligned;
// 16 short reads in a row without progress, an error or an early end of file throw edgemoe::Error naming
// `path` and `what`. (Exposed for the tests, which feed it short reads.)
// Copies n bytes of this process's own memory from src to dst with process_vm_readv, which reports a page
// that cannot be read (a file mapping past the end of a truncated file) as an error instead of raising
// SIGBUS. Returns the bytes copied (fewer than n: the page after them could not be read, errno EFAULT), or -1
// with errno (EFAULT at the first page; ENOSYS/EPERM where the call is unavailable).
ssize_t copy_from_own_memory(uint8_t* dst, const uint8_t* src, size_t n);

using PreadFn = std::function<ssize_t(uint8_t* dst, size_t n, uint64_t offset)>;
void read_fully(const PreadFn& pread_fn, const std::string& path, const std::string& what, uint64_t offset,
                uint64_t length, uint8_t* dst, uint64_t align);

}  // namespace edgemoe
