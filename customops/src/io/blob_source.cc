// The three blob sources. `direct` reads with O_DIRECT into page-aligned buffers (the page cache is never
// touched); `buffered` reads through the page cache with readahead disabled (POSIX_FADV_RANDOM) and drops
// exactly the pages it read, so no store page stays cached; `mmap` copies from a read-only mapping (page
// faults do the I/O; the kernel's fault-around and readahead are outside the store's control).
#include "edgemoe/blob_source.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "edgemoe/arena.h"
#include "edgemoe/manifest.h"

namespace edgemoe {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

IoMode parse_io_mode(const std::string& s) {
  if (s == "direct") return IoMode::Direct;
  if (s == "buffered") return IoMode::Buffered;
  if (s == "mmap") return IoMode::Mmap;
  throw Error("edgemoe.io_mode: expected one of direct, buffered, mmap, found '" + s + "'");
}

const char* io_mode_name(IoMode m) {
  switch (m) {
    case IoMode::Direct: return "direct";
    case IoMode::Buffered: return "buffered";
    case IoMode::Mmap: return "mmap";
  }
  return "?";
}

namespace {

Error open_error(const std::string& path, const char* how, int err) {
  return Error(error_message(path, -1, -1, "store.file", std::string("cannot open the store (") + how + ")",
                             "a readable file", err == ENOENT ? "nothing" : std::strerror(err)));
}

Error read_error(const std::string& path, const std::string& what, uint64_t offset, uint64_t length,
                 const std::string& message, const std::string& found) {
  return Error(path + ": " + what + ": blob bytes: " + message + " (expected " + std::to_string(length) +
               " bytes at offset " + std::to_string(offset) + ", found " + found + ")");
}

// pread of the whole range, looping on short reads and EINTR.
void pread_all(int fd, const std::string& path, uint64_t offset, uint64_t length, uint8_t* dst,
               const std::string& what) {
  uint64_t done = 0;
  while (done < length) {
    const ssize_t r = ::pread(fd, dst + done, length - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw read_error(path, what, offset, length, std::string("read failed: ") + std::strerror(errno),
                       std::to_string(done) + " bytes");
    }
    if (r == 0)
      throw read_error(path, what, offset, length, "truncated store (unexpected end of file)",
                       std::to_string(done) + " bytes");
    done += static_cast<uint64_t>(r);
  }
}

class BufferedSource final : public BlobSource {
 public:
  BufferedSource(std::string path, UniqueFd fd, std::string note) : path_(std::move(path)), fd_(std::move(fd)),
                                                                    note_(std::move(note)) {
    // No readahead on this descriptor: a read brings in exactly its range, which is dropped right after.
    ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_RANDOM);
  }
  ~BufferedSource() override { ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED); }
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) override {
    pread_all(fd_.get(), path_, offset, length, dst, what);
    ::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
  }
  IoMode mode() const override { return IoMode::Buffered; }
  const std::string& note() const override { return note_; }

 private:
  std::string path_;
  UniqueFd fd_;
  std::string note_;
};

class DirectSource final : public BlobSource {
 public:
  DirectSource(std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) override {
    pread_all(fd_.get(), path_, offset, length, dst, what);
  }
  IoMode mode() const override { return IoMode::Direct; }
  const std::string& note() const override { return note_; }

 private:
  std::string path_;
  UniqueFd fd_;
  std::string note_;
};

class MmapSource final : public BlobSource {
 public:
  MmapSource(std::string path, UniqueFd fd, uint64_t size) : path_(std::move(path)), fd_(std::move(fd)), len_(size) {
    if (len_ == 0) return;
    void* p = ::mmap(nullptr, len_, PROT_READ, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      throw Error(error_message(path_, -1, -1, "store.file", "cannot mmap the store", "a mappable file",
                                std::strerror(err)));
    }
    map_ = static_cast<const uint8_t*>(p);
  }
  ~MmapSource() override {
    if (map_) ::munmap(const_cast<uint8_t*>(map_), len_);
  }
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) override {
    // The mapping was made at the validated size; a file truncated since then would SIGBUS on access.
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) throw read_error(path_, what, offset, length, "fstat failed", std::strerror(errno));
    if (static_cast<uint64_t>(st.st_size) < offset + length || offset + length > len_)
      throw read_error(path_, what, offset, length, "truncated store",
                       "a file of " + std::to_string(st.st_size) + " bytes");
    std::memcpy(dst, map_ + offset, length);
    // Drop this range from the mapping and the page cache (what readahead brought in around it stays: the
    // OS decides; it is reclaimable page cache, outside the budget).
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t a = offset / page * page;
    ::madvise(const_cast<uint8_t*>(map_) + a, offset + length - a, MADV_DONTNEED);
    ::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
  }
  IoMode mode() const override { return IoMode::Mmap; }
  const std::string& note() const override { return note_; }

 private:
  std::string path_;
  UniqueFd fd_;
  uint64_t len_ = 0;
  const uint8_t* map_ = nullptr;
  std::string note_;
};

}  // namespace

std::unique_ptr<BlobSource> open_blob_source(const std::string& path, uint64_t size, IoMode mode) {
  std::string note;
  if (mode == IoMode::Direct) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
    if (!fd) {
      if (errno != EINVAL) throw open_error(path, "O_DIRECT", errno);
      note = "O_DIRECT not supported for " + path + " (open: " + std::strerror(EINVAL) +
             "); using buffered reads (POSIX_FADV_RANDOM + DONTNEED)";
    } else if (size >= 4096) {
      // Some filesystems accept O_DIRECT at open and refuse it at read time: probe one aligned block.
      MappedBuffer probe(4096, ArenaOptions{});
      ssize_t r;
      int err = 0;
      do {
        r = ::pread(fd.get(), probe.data(), 4096, 0);
        err = r < 0 ? errno : 0;
      } while (r < 0 && err == EINTR);
      if (r < 0 && err == EINVAL) {
        note = "O_DIRECT not supported for " + path + " (read: " + std::strerror(EINVAL) +
               "); using buffered reads (POSIX_FADV_RANDOM + DONTNEED)";
      } else if (r < 0) {
        throw Error(error_message(path, -1, -1, "store.file", "cannot read the store (O_DIRECT probe of the first block)",
                                  "a readable file", std::strerror(err)));
      } else {
        return std::make_unique<DirectSource>(path, std::move(fd));
      }
    } else {
      return std::make_unique<DirectSource>(path, std::move(fd));
    }
    mode = IoMode::Buffered;
  }
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw open_error(path, mode == IoMode::Mmap ? "mmap" : "buffered", errno);
  if (mode == IoMode::Mmap) return std::make_unique<MmapSource>(path, std::move(fd), size);
  return std::make_unique<BufferedSource>(path, std::move(fd), std::move(note));
}

}  // namespace edgemoe
