// The three blob sources. `direct` reads with O_DIRECT into page-aligned buffers (the page cache is never
// touched); `buffered` reads through the page cache with readahead disabled (POSIX_FADV_RANDOM) and drops
// exactly the pages it read, so no store page stays cached; `mmap` copies from a read-only mapping (page
// faults do the I/O; the kernel's fault-around and readahead are outside the store's control). The copy out
// of the mapping goes through process_vm_readv, so a store truncated while mapped is a read error, not SIGBUS.
#include "edgemoe/blob_source.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
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
Error read_error(const std::string& path, const std::string& what, uint64_t offset, uint64_t length,
                 const std::string& message, const std::string& found) {
  return Error(path + ": " + what + ": blob bytes: " + message + " (expected " + std::to_string(length) +
               " bytes at offset " + std::to_string(offset) + ", found " + found + ")");
}
constexpr int kMaxShortReadsWithoutProgress = 16;
constexpr int kMaxInterruptsInARow = 1000;
}  // namespace

ssize_t copy_from_own_memory(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t done = 0;
  while (done < n) {
    iovec local{dst + done, n - done};
    iovec remote{const_cast<uint8_t*>(src + done), n - done};
    const ssize_t r = ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (done == 0) return -1;
      errno = EFAULT;
      return static_cast<ssize_t>(done);
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

void read_fully(const PreadFn& pread_fn, const std::string& path, const std::string& what, uint64_t offset,
                uint64_t length, uint8_t* dst, uint64_t align) {
  uint64_t done = 0;  // a multiple of `align` (or `length`): every pread starts aligned in the file and in dst
  int stalls = 0, interrupts = 0;
  while (done < length) {
    const ssize_t r = pread_fn(dst + done, static_cast<size_t>(length - done), offset + done);
    if (r < 0) {
      if (errno == EINTR && ++interrupts <= kMaxInterruptsInARow) continue;
      if (errno == EINTR)  // a signal storm: give up instead of spinning an I/O thread forever
        throw read_error(path, what, offset, length,
                         "read interrupted (EINTR " + std::to_string(interrupts - 1) + " times in a row)",
                         std::to_string(done) + " bytes");
      throw read_error(path, what, offset, length, std::string("read failed: ") + std::strerror(errno),
                       std::to_string(done) + " bytes");
    }
    if (r == 0)
      throw read_error(path, what, offset, length, "truncated store (unexpected end of file)",
                       std::to_string(done) + " bytes");
    uint64_t next = done + std::min<uint64_t>(static_cast<uint64_t>(r), length - done);
    // O_DIRECT: a short read may end mid-block; the rest is read again from the block that covers it (an
    // unaligned pread would fail with EINVAL). The bytes of that block already read are read once more.
    if (align > 1 && next < length) next = next / align * align;
    interrupts = 0;
    if (next > done) {
      done = next;
      stalls = 0;
    } else if (++stalls > kMaxShortReadsWithoutProgress) {
      throw read_error(path, what, offset, length,
                       "short reads without progress (" + std::to_string(stalls) + " in a row)",
                       std::to_string(done) + " bytes");
    }
  }
}

namespace {

Error open_error(const std::string& path, const char* how, int err) {
  return Error(error_message(path, -1, -1, "store.file", std::string("cannot open the store (") + how + ")",
                             "a readable file", err == ENOENT ? "nothing" : std::strerror(err)));
}

const char* file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  return "another kind of file";
}

// Opens `path` with `flags` and O_NONBLOCK, so that whatever the path names by now (the manifest reader
// stat()ed it earlier: a FIFO or device may have been put in its place) the open returns at once; checks
// on the descriptor that it is a regular file of `size` bytes, then clears O_NONBLOCK. Returns an empty fd
// with *err set if open() itself failed; throws edgemoe::Error if the descriptor is not the store.
UniqueFd open_store(const std::string& path, int flags, uint64_t size, int* err) {
  UniqueFd fd(::open(path.c_str(), flags | O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) {
    *err = errno;
    return fd;
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    throw Error(error_message(path, -1, -1, "store.file", "cannot stat the store", "a readable file",
                              std::strerror(errno)));
  if (!S_ISREG(st.st_mode))
    throw Error(error_message(path, -1, -1, "store.file", "", "a regular file", file_kind(st.st_mode)));
  const uint64_t actual = static_cast<uint64_t>(st.st_size);
  if (actual != size)
    throw Error(error_message(path, -1, -1, "size (manifest store.size)",
                              actual < size ? "truncated store" : "store size mismatch", std::to_string(size),
                              std::to_string(actual)));
  const int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) != 0)
    throw Error(error_message(path, -1, -1, "store.file", "cannot set up the store descriptor (fcntl)",
                              "a regular file", std::strerror(errno)));
  return fd;
}

void pread_all(int fd, const std::string& path, uint64_t offset, uint64_t length, uint8_t* dst,
               const std::string& what, uint64_t align) {
  read_fully([fd](uint8_t* d, size_t n, uint64_t off) { return ::pread(fd, d, n, static_cast<off_t>(off)); },
             path, what, offset, length, dst, align);
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
    pread_all(fd_.get(), path_, offset, length, dst, what, 1);
    ::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
  }
  IoMode mode() const override { return IoMode::Buffered; }
  const std::string& note() const override { return note_; }

 private:
  std::string path_;
  UniqueFd fd_;
  std::string note_;
};

constexpr uint64_t kDirectAlign = 4096;  // the store's alignment: offsets, lengths and buffers

class DirectSource final : public BlobSource {
 public:
  DirectSource(std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  void read(uint64_t offset, uint64_t length, uint8_t* dst, const std::string& what) override {
    pread_all(fd_.get(), path_, offset, length, dst, what, kDirectAlign);
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
    // Where process_vm_readv is refused (a seccomp profile, a kernel without it) the bytes are read through
    // the descriptor instead: the kernel checks those bounds too, so no access can raise SIGBUS either way.
    const uint8_t probe_src = 1;
    uint8_t probe = 0;
    if (copy_from_own_memory(&probe, &probe_src, 1) != 1) {  // probes the call, not the store's pages
      note_ = std::string("mmap: process_vm_readv unavailable (") + std::strerror(errno) +
              "); blobs are read through the store's descriptor";
      use_pread_ = true;
    }
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
    if (use_pread_) {
      const int fd = fd_.get();
      read_fully([fd](uint8_t* d, size_t n, uint64_t off) { return ::pread(fd, d, n, static_cast<off_t>(off)); }, path_,
                 what, offset, length, dst, 1);
    } else {
      // The file may shrink between the fstat above and the copy: pages past its new end are an EFAULT here.
      const ssize_t got = copy_from_own_memory(dst, map_ + offset, static_cast<size_t>(length));
      if (got < 0 || static_cast<uint64_t>(got) != length) {
        const int err = errno;
        struct stat now {};
        const bool have_size = ::fstat(fd_.get(), &now) == 0;
        const std::string size_now = have_size ? "a file of " + std::to_string(now.st_size) + " bytes" : "an unreadable file";
        const bool shrank = have_size && static_cast<uint64_t>(now.st_size) < offset + length;
        std::string why;
        if (shrank) why = "truncated store (shrank while mapped)";
        else if (err == EFAULT || got >= 0) why = "read failed: a page of the mapping could not be read (a media error?)";
        else why = std::string("read failed: ") + std::strerror(err);
        throw read_error(path_, what, offset, length, why, size_now);
      }
    }
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
  bool use_pread_ = false;
  std::string note_;
};

}  // namespace

std::unique_ptr<BlobSource> open_blob_source(const std::string& path, uint64_t size, IoMode mode) {
  // One open per source, and only that descriptor is used (no second look-up of the path). The one
  // exception: O_DIRECT refused at open() (EINVAL), where the buffered descriptor is a second, checked open.
  std::string note;
  int err = 0;
  UniqueFd fd;
  if (mode == IoMode::Direct) {
    fd = open_store(path, O_DIRECT, size, &err);
    if (!fd) {
      if (err != EINVAL) throw open_error(path, "O_DIRECT", err);
      note = "O_DIRECT not supported for " + path + " (open: " + std::strerror(EINVAL) +
             "); using buffered reads (POSIX_FADV_RANDOM + DONTNEED)";
    } else if (size >= 4096) {
      // Some filesystems accept O_DIRECT at open and refuse it at read time: probe one aligned block.
      MappedBuffer probe(4096, ArenaOptions{});
      ssize_t r;
      do {
        r = ::pread(fd.get(), probe.data(), 4096, 0);
        err = r < 0 ? errno : 0;
      } while (r < 0 && err == EINTR);
      if (r < 0 && err == EINVAL) {
        note = "O_DIRECT not supported for " + path + " (read: " + std::strerror(EINVAL) +
               "); using buffered reads (POSIX_FADV_RANDOM + DONTNEED)";
        const int fl = ::fcntl(fd.get(), F_GETFL);
        if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_DIRECT) != 0) fd.reset();  // reopened below
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
  if (!fd) {
    fd = open_store(path, 0, size, &err);
    if (!fd) throw open_error(path, mode == IoMode::Mmap ? "mmap" : "buffered", err);
  }
  if (mode == IoMode::Mmap) return std::make_unique<MmapSource>(path, std::move(fd), size);
  return std::make_unique<BufferedSource>(path, std::move(fd), std::move(note));
}

}  // namespace edgemoe
