/* An LD_PRELOAD shim that injects I/O faults into pread()/pread64() on one file (issue 15).
 *
 * Faults apply only to descriptors whose path (readlink /proc/self/fd/N) ends with the configured suffix
 * (default "/experts.bin"); every other descriptor is passed straight through. The fault plan is read from
 * the file named by $FAULTSHIM_CONTROL (the variable is read once, when the shim loads), stat()ed on every
 * pread of any descriptor and re-read when its inode, size or mtime changed (write a temporary file and
 * rename it over the control file: the switch is atomic and seen by the next pread). A missing or empty
 * control file means no faults.
 *
 * The control file: one directive per line, '#' starts a comment.
 *   suffix=/experts.bin                    which descriptors are faulted (path suffix)
 *   <kind> [count=N] [every=K] [lo=A] [hi=B] [ms=D] [bytes=S]
 * kinds:
 *   eio             return -1 with errno EIO (nothing read)
 *   eintr           return -1 with errno EINTR (nothing read)
 *   short           read as asked, then return only `bytes` bytes (default: half, at least 1; never more
 *                   than the real read returned). The real pread gets the full request, so O_DIRECT's
 *                   alignment rules still hold
 *   delay           sleep `ms` milliseconds (default 10), then read
 *   corrupt_reread  the first read of an offset (since this plan was loaded) returns the right bytes; a later
 *                   read of the same offset returns them with bytes flipped (the first one and one in every
 *                   4096)
 * options (all rules): the rule looks only at preads whose range [off, off + n) overlaps [lo, hi) (default:
 * the whole file); of those it fires on every K-th one (every=K, default 1), at most N times in all (count=N,
 * default unlimited). Numbers are decimal or 0x-hexadecimal. Up to 16 rules; they combine (a delay rule and
 * an eio rule both act on one pread: the sleep, then the error).
 *
 * Counters (since the plan was loaded; read with ctypes.CDLL(None) in the preloaded process; the first three
 * also load a changed plan, so calling faultshim_rules() right after writing the control file applies it):
 *   long faultshim_generation(void)  plans loaded so far (0 before the first pread)
 *   long faultshim_rules(void)       rules of the current plan; -1 if the control file did not parse
 *   const char* faultshim_error(void) why it did not parse ("" if it did)
 *   long faultshim_matched(void)     preads of a descriptor of the faulted file (also when no rule is on)
 *   long faultshim_fired(const char* kind)  times rules of that kind fired (all kinds: NULL)
 *
 * No allocation, no stdio: only syscalls, a static table and one mutex (the library reads on several I/O
 * threads at once). The sleep and the real read run outside the mutex. Only pread/pread64 are interposed:
 * libedgemoe_customops.so reads the store with pread alone (no preadv, no read; `mmap` mode reads through
 * page faults, which no shim of this kind can reach).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_RULES 16
#define MAX_CONTROL 8192
#define SEEN_SLOTS 8192 /* offsets remembered for corrupt_reread (open addressing) */

enum kind { K_EIO, K_EINTR, K_SHORT, K_DELAY, K_CORRUPT, K_COUNT };
static const char* const kind_names[K_COUNT] = {"eio", "eintr", "short", "delay", "corrupt_reread"};

struct rule {
  int kind;
  long count;   /* firings left; -1 = unlimited */
  long every;   /* fire on every K-th matching pread */
  long seen;    /* matching preads so far */
  long fired;
  uint64_t lo, hi;
  long ms;
  long bytes;   /* short: bytes returned (0 = half) */
};

typedef ssize_t (*pread_fn)(int, void*, size_t, off_t);

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pread_fn real_pread, real_pread64;
static struct rule rules[MAX_RULES];
static int nrules;
static long generation, matched, bad_plan;
static char suffix[256] = "/experts.bin";
static size_t suffix_len = 12;
static char plan_error[256];
static char control_path[4096]; /* $FAULTSHIM_CONTROL, copied at load time ("" = no faults) */
static struct stat plan_st; /* of the control file the plan came from (if plan_present) */
static int plan_present;
static uint64_t seen_off[SEEN_SLOTS]; /* offset + 1; 0 = empty */
static long seen_gen[SEEN_SLOTS];     /* plan generation that saw it */

/* Records why the control file did not parse (msg + the line); returns -1. */
static int set_error(const char* msg, const char* line, size_t len) {
  size_t n = strlen(msg);
  if (n > sizeof plan_error - 1) n = sizeof plan_error - 1;
  memcpy(plan_error, msg, n);
  size_t room = sizeof plan_error - 1 - n;
  if (len > room) len = room;
  memcpy(plan_error + n, line, len);
  plan_error[n + len] = 0;
  return -1;
}

static int parse_u64(const char* s, const char* end, uint64_t* out) {
  uint64_t v = 0;
  int base = 10;
  if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    s += 2;
  }
  if (s == end) return -1;
  for (; s < end; ++s) {
    int d;
    if (*s >= '0' && *s <= '9') d = *s - '0';
    else if (base == 16 && *s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
    else if (base == 16 && *s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
    else return -1;
    if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base) return -1;
    v = v * (uint64_t)base + (uint64_t)d;
  }
  *out = v;
  return 0;
}

static int word_is(const char* s, const char* end, const char* w) {
  size_t n = strlen(w);
  return (size_t)(end - s) == n && memcmp(s, w, n) == 0;
}

/* Parses one line into rules[nrules] (or the suffix). 0 = ok, -1 = error (plan_error set). */
static int parse_line(const char* s, const char* end) {
  const char* line = s;
  const size_t line_len = (size_t)(end - s);
  while (s < end && (*s == ' ' || *s == '\t' || *s == '\r')) ++s;
  while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) --end;
  if (s == end || *s == '#') return 0;
  if (end - s > 7 && memcmp(s, "suffix=", 7) == 0) {
    size_t n = (size_t)(end - s - 7);
    if (n == 0 || n >= sizeof suffix) return set_error("bad suffix: ", line, line_len);
    memcpy(suffix, s + 7, n);
    suffix[n] = 0;
    suffix_len = n;
    return 0;
  }
  if (nrules == MAX_RULES) return set_error("too many rules: ", line, line_len);
  struct rule r = {.kind = -1, .count = -1, .every = 1, .lo = 0, .hi = UINT64_MAX, .ms = 10};
  int first = 1;
  while (s < end) {
    const char* w = s;
    while (s < end && *s != ' ' && *s != '\t') ++s;
    const char* we = s;
    while (s < end && (*s == ' ' || *s == '\t')) ++s;
    if (first) {
      for (int k = 0; k < K_COUNT; ++k)
        if (word_is(w, we, kind_names[k])) r.kind = k;
      if (r.kind < 0) return set_error("unknown fault kind: ", line, line_len);
      first = 0;
      continue;
    }
    const char* eq = memchr(w, '=', (size_t)(we - w));
    uint64_t v;
    if (!eq || parse_u64(eq + 1, we, &v) != 0) return set_error("expected key=number: ", line, line_len);
    if (word_is(w, eq, "count")) r.count = (long)v;
    else if (word_is(w, eq, "every") && v == 0) return set_error("every: expected >= 1: ", line, line_len);
    else if (word_is(w, eq, "every")) r.every = (long)v;
    else if (word_is(w, eq, "lo")) r.lo = v;
    else if (word_is(w, eq, "hi")) r.hi = v;
    else if (word_is(w, eq, "ms")) r.ms = (long)v;
    else if (word_is(w, eq, "bytes")) r.bytes = (long)v;
    else return set_error("unknown option: ", line, line_len);
  }
  rules[nrules++] = r;
  return 0;
}

/* Loads the plan from the control file's current contents. Called with mu held. */
static void load_plan(const char* path) {
  static char buf[MAX_CONTROL];
  ++generation;
  nrules = 0;
  matched = 0;
  bad_plan = 0;
  plan_error[0] = 0;
  memcpy(suffix, "/experts.bin", 13);
  suffix_len = 12;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  size_t n = 0;
  for (;;) {
    ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    n += (size_t)r;
    if (n == sizeof buf - 1) break;
  }
  close(fd);
  const char* p = buf;
  const char* end = buf + n;
  while (p < end) {
    const char* nl = memchr(p, '\n', (size_t)(end - p));
    const char* le = nl ? nl : end;
    if (parse_line(p, le) != 0) {
      nrules = 0;
      bad_plan = 1;
      return;
    }
    p = le + (nl ? 1 : 0);
  }
}

/* Re-reads the plan if the control file changed (or appeared / disappeared). Called with mu held. */
static void refresh_plan(void) {
  const char* path = control_path;
  if (!path[0]) return;
  struct stat st;
  int present = stat(path, &st) == 0;
  if (generation > 0 && present == plan_present &&
      (!present || (st.st_ino == plan_st.st_ino && st.st_dev == plan_st.st_dev && st.st_size == plan_st.st_size &&
                    st.st_mtim.tv_sec == plan_st.st_mtim.tv_sec && st.st_mtim.tv_nsec == plan_st.st_mtim.tv_nsec)))
    return;
  plan_present = present;
  if (present) plan_st = st;
  load_plan(path);
}

static int fd_is_target(int fd) {
  char link[64], target[4096];
  /* "/proc/self/fd/<fd>" without snprintf */
  static const char prefix[] = "/proc/self/fd/";
  char digits[16];
  int nd = 0;
  unsigned v = (unsigned)fd;
  do {
    digits[nd++] = (char)('0' + v % 10);
    v /= 10;
  } while (v && nd < (int)sizeof digits);
  memcpy(link, prefix, sizeof prefix - 1);
  int i = (int)sizeof prefix - 1;
  while (nd) link[i++] = digits[--nd];
  link[i] = 0;
  ssize_t n = readlink(link, target, sizeof target);
  if (n <= 0 || (size_t)n >= sizeof target) return 0;
  pthread_mutex_lock(&mu);
  int hit = (size_t)n >= suffix_len && memcmp(target + n - suffix_len, suffix, suffix_len) == 0;
  pthread_mutex_unlock(&mu);
  return hit;
}

/* 1 if `off` was read before under the current plan; records it otherwise. Called with mu held. */
static int seen_before(uint64_t off) {
  uint64_t h = (off >> 12) * 0x9E3779B97F4A7C15ull;
  for (unsigned probe = 0; probe < SEEN_SLOTS; ++probe) {
    size_t i = (size_t)((h + probe) % SEEN_SLOTS);
    if (seen_off[i] == off + 1) {
      if (seen_gen[i] == generation) return 1;
      seen_gen[i] = generation;
      return 0;
    }
    if (seen_off[i] == 0) {
      seen_off[i] = off + 1;
      seen_gen[i] = generation;
      return 0;
    }
  }
  return 0; /* table full: treated as a first read */
}

static int fires(struct rule* r) {
  ++r->seen;
  if (r->count == 0 || r->seen % r->every != 0) return 0;
  if (r->count > 0) --r->count;
  ++r->fired;
  return 1;
}

static ssize_t faulty_pread(pread_fn real, int fd, void* buf, size_t n, off_t off) {
  int err = 0;
  long delay_ms = 0, short_to = -1;
  int corrupt = 0;
  pthread_mutex_lock(&mu);
  refresh_plan();
  pthread_mutex_unlock(&mu);
  if (!fd_is_target(fd)) return real(fd, buf, n, off);

  const uint64_t a = (uint64_t)off, b = (uint64_t)off + n;
  pthread_mutex_lock(&mu);
  ++matched; /* also without rules: a test can check that the shim sees the store's reads at all */
  int first_read = -1; /* computed once, only if a corrupt_reread rule looks at this pread */
  for (int i = 0; i < nrules; ++i) {
    struct rule* r = &rules[i];
    if (!(a < r->hi && r->lo < b)) continue;
    if (r->kind == K_CORRUPT) {
      if (first_read < 0) first_read = !seen_before(a);
      if (first_read) continue; /* the first read of an offset is always right */
    }
    if (!fires(r)) continue;
    switch (r->kind) {
      case K_EIO: if (!err) err = EIO; break;
      case K_EINTR: if (!err) err = EINTR; break;
      case K_SHORT: {
        long want = r->bytes > 0 ? r->bytes : (long)(n / 2);
        if (want < 1) want = 1;
        if (short_to < 0 || want < short_to) short_to = want;
        break;
      }
      case K_DELAY: delay_ms += r->ms; break;
      case K_CORRUPT: corrupt = 1; break;
    }
  }
  pthread_mutex_unlock(&mu);

  if (delay_ms > 0) {
    struct timespec ts = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  }
  if (err) {
    errno = err;
    return -1;
  }
  ssize_t got = real(fd, buf, n, off);
  if (got <= 0) return got;
  if (short_to >= 0 && got > short_to) got = short_to;
  if (corrupt) {
    unsigned char* p = (unsigned char*)buf;
    for (ssize_t i = 0; i < got; i += 4096) p[i] ^= 0xFF;
  }
  return got;
}

static pread_fn resolve(const char* name) {
  pread_fn f = (pread_fn)dlsym(RTLD_NEXT, name);
  if (!f) {
    static const char msg[] = "faultshim: dlsym(RTLD_NEXT) found no pread\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    abort();
  }
  return f;
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init(void) {
  const char* path = getenv("FAULTSHIM_CONTROL");
  if (path && strlen(path) < sizeof control_path) memcpy(control_path, path, strlen(path) + 1);
  __atomic_store_n(&real_pread, resolve("pread"), __ATOMIC_RELEASE);
  __atomic_store_n(&real_pread64, resolve("pread64"), __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void faultshim_init(void) { pthread_once(&init_once, init); }

ssize_t pread(int fd, void* buf, size_t n, off_t off) {
  pthread_once(&init_once, init); /* (a pread from another library's constructor may come before ours) */
  return faulty_pread(__atomic_load_n(&real_pread, __ATOMIC_ACQUIRE), fd, buf, n, off);
}

ssize_t pread64(int fd, void* buf, size_t n, off_t off) {
  pthread_once(&init_once, init);
  return faulty_pread(__atomic_load_n(&real_pread64, __ATOMIC_ACQUIRE), fd, buf, n, off);
}

/* --- counters for the tests ------------------------------------------------------------------------------ */
long faultshim_generation(void) {
  pthread_mutex_lock(&mu);
  refresh_plan();
  long g = generation;
  pthread_mutex_unlock(&mu);
  return g;
}

long faultshim_rules(void) {
  pthread_mutex_lock(&mu);
  refresh_plan();
  long n = bad_plan ? -1 : nrules;
  pthread_mutex_unlock(&mu);
  return n;
}

const char* faultshim_error(void) {
  pthread_mutex_lock(&mu);
  refresh_plan();
  pthread_mutex_unlock(&mu);
  return plan_error;
}

long faultshim_matched(void) {
  pthread_mutex_lock(&mu);
  long m = matched;
  pthread_mutex_unlock(&mu);
  return m;
}

long faultshim_fired(const char* kind) {
  long total = 0;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < nrules; ++i)
    if (!kind || strcmp(kind, kind_names[rules[i].kind]) == 0) total += rules[i].fired;
  pthread_mutex_unlock(&mu);
  return total;
}
