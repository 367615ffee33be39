// The shared region (see region.h for the protocol).
#include "region.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "cpu/copy.h"
#include "cpu/relax.h"

namespace pyasgd {
namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free, "need lock-free 64-bit atomics");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "need lock-free 32-bit atomics");

// The header's fixed fields are read by other processes (attach, the sweep, older and newer
// builds' sweeps) at these offsets; tests/mp_helpers.py corrupts them by offset too.
static_assert(offsetof(Header, magic) == 0 && offsetof(Header, layout_version) == 8 &&
              offsetof(Header, owner_pid) == 12 && offsetof(Header, n) == 16 &&
              offsetof(Header, slots) == 24 && offsetof(Header, param_offset) == 32 &&
              offsetof(Header, slot_meta_offset) == 48 && offsetof(Header, slot_data_offset) == 56 &&
              offsetof(Header, slot_stride) == 64 && offsetof(Header, total_bytes) == 72 &&
              offsetof(Header, grad_dtype) == 80,
              "header field offsets are part of the segment format");

constexpr uint64_t kAlign = 4096;  // page-aligned buffers: DMA-friendly and 64-byte aligned for SIMD
constexpr uint64_t round_up_small(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// The first bytes of every segment, written before anything else (see create()).
struct Identity {
  uint64_t magic;
  uint32_t layout_version;
  int32_t owner_pid;
};
static_assert(sizeof(Identity) == 16, "identity is the header's first 16 bytes");

// Lays out a region of n fp32 parameters and `slots` gradient slots of `grad_dtype`, every
// product and sum checked: false (with the reason) when it does not fit 64-bit offsets. Both
// create() and attach() use it, so a header is valid exactly when it equals what this computes
// from its own n, slots and grad_dtype.
bool compute_layout(uint64_t n, uint64_t slots, uint32_t grad_dtype, Layout* out, std::string* why) {
  if (n == 0) return *why = "n = 0 (a region holds at least one parameter)", false;
  if (slots == 0 || slots > kMaxSlots)
    return *why = "slots = " + std::to_string(slots) + " is outside 1.." + std::to_string(kMaxSlots), false;
  if (grad_dtype != kGradF32 && grad_dtype != kGradBF16)
    return *why = "grad_dtype = " + std::to_string(grad_dtype) + " is not a gradient type (0: fp32, 1: bf16)", false;
  uint64_t bytes, buf, gbytes, slot, metas, two, data, p1, meta_off, data_off, total;
  const uint64_t header = round_up_small(sizeof(Header));
  bool bad = __builtin_mul_overflow(n, sizeof(float), &bytes) ||
             __builtin_add_overflow(bytes, kAlign - 1, &buf) ||
             __builtin_mul_overflow(n, grad_bytes(grad_dtype), &gbytes) ||
             __builtin_add_overflow(gbytes, kAlign - 1, &slot) ||
             __builtin_mul_overflow(slots, sizeof(SlotMeta), &metas) ||
             __builtin_add_overflow(metas, kAlign - 1, &metas);
  if (!bad) {
    buf = buf / kAlign * kAlign;
    slot = slot / kAlign * kAlign;  // page-aligned slots: 64-byte aligned for the kernels
    metas = metas / kAlign * kAlign;
    bad = __builtin_mul_overflow(buf, 2, &two) || __builtin_mul_overflow(slot, slots, &data) ||
          __builtin_add_overflow(header, buf, &p1) || __builtin_add_overflow(header, two, &meta_off) ||
          __builtin_add_overflow(meta_off, metas, &data_off) ||
          __builtin_add_overflow(data_off, data, &total) ||
          total > static_cast<uint64_t>(INT64_MAX) || total > SIZE_MAX;  // off_t and size_t
  }
  if (bad)
    return *why = "n = " + std::to_string(n) + " and slots = " + std::to_string(slots) +
                  " overflow a 64-bit segment size", false;
  out->n = n;
  out->slots = slots;
  out->grad_dtype = grad_dtype;
  out->param_offset[0] = header;
  out->param_offset[1] = p1;
  out->slot_meta_offset = meta_off;
  out->slot_data_offset = data_off;
  out->slot_stride = slot;
  out->total_bytes = total;
  return true;
}

using Clock = std::chrono::steady_clock;

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

bool pid_dead(int pid) { return pid > 0 && kill(pid, 0) == -1 && errno == ESRCH; }

// Where segments live: /dev/shm unless PYASGD_SHM_DIR names another (tmpfs) directory, read on
// every call so a process and the children it spawns agree. A segment is opened as a plain file
// there (what shm_open does under /dev/shm), so any directory works the same way.
std::string shm_dir() {
  const char* env = std::getenv("PYASGD_SHM_DIR");
  std::string d = env && *env ? env : "/dev/shm";
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

bool same_file(int fd, const std::string& path) {
  struct stat a, b;
  return fstat(fd, &a) == 0 && lstat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// The advice when the segment's directory cannot hold the region: the numbers, then the fixes.
std::string space_message(const std::string& dir, const Layout& L, uint64_t free_bytes, int err) {
  const uint64_t want_mib = (L.total_bytes + L.total_bytes / 4 + (1 << 20) - 1) >> 20;  // +25%
  const std::string size = want_mib >= 1024 ? std::to_string((want_mib + 1023) / 1024) + "g"
                                            : std::to_string(want_mib) + "m";
  return "the shared region needs " + mib(L.total_bytes) + " (" + std::to_string(L.n) +
         " parameters x (2 fp32 published buffers + " + std::to_string(L.slots) + " " +
         (L.grad_dtype == kGradBF16 ? "bf16" : "fp32") + " gradient slots)) but " + dir +
         " has only " + mib(free_bytes) + " free (" +
         std::strerror(err) + "). Fix: give the container more shared memory (docker run "
         "--shm-size=" + size + "; Docker's default /dev/shm is 64 MiB), point PYASGD_SHM_DIR "
         "at a larger tmpfs, or train fewer parameters or use fewer slots (workers + global_accum).";
}

// The locked fds (the owner's flock fd, each process's slot-lock fd), registered so that a forked
// child can drop its inherited copies: a lock belongs to the open file description, so a child
// holding a duplicate would keep a dead owner's segment "alive" for the sweep (or a dead pusher's
// slot from being reclaimed). Entries hold fd + 1 (0: empty); static zero-init, and
// no lock, since the child handler runs where only the forking thread exists. A fork racing a
// create() in another thread may still inherit the fd before it is registered: that child then
// keeps the segment until it exits, which delays the sweep but never removes a live segment.
constexpr int kMaxOwned = 256;
std::atomic<int> g_owner_fds[kMaxOwned];

void drop_owner_locks_in_child() {
  for (auto& e : g_owner_fds)
    if (int v = e.exchange(0)) ::close(v - 1);  // closes the child's copy; the parent keeps its lock
}
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, drop_owner_locks_in_child);

int register_owner_lock(int fd) {
  for (int i = 0; i < kMaxOwned; ++i) {
    int empty = 0;
    if (g_owner_fds[i].compare_exchange_strong(empty, fd + 1)) return i;
  }
  return -1;
}

void release_owner_lock(int entry) {
  if (int v = g_owner_fds[entry].exchange(0)) ::close(v - 1);
}

// Test-only: PYASGD_TEST_REGION_DELAY=<point>:<ms> sleeps at one named step of the protocol, so
// the tests can force the interleavings that are otherwise a matter of luck. Read once.
void test_delay(const char* point) {
  static const std::pair<std::string, int> cfg = [] {
    const char* env = std::getenv("PYASGD_TEST_REGION_DELAY");
    std::string spec = env ? env : "";
    auto colon = spec.find(':');
    if (colon == std::string::npos) return std::make_pair(std::string(), 0);
    return std::make_pair(spec.substr(0, colon), std::atoi(spec.c_str() + colon + 1));
  }();
  if (cfg.second > 0 && cfg.first == point)
    std::this_thread::sleep_for(std::chrono::milliseconds(cfg.second));
}

// Shared (not private) futex: the word lives in memory mapped by several processes.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, double seconds) {
  if (seconds <= 0) return;
  timespec ts;
  ts.tv_sec = static_cast<time_t>(seconds);
  ts.tv_nsec = static_cast<long>((seconds - static_cast<double>(ts.tv_sec)) * 1e9);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

void bump_and_wake(std::atomic<uint32_t>& word, std::atomic<uint32_t>& sleepers) {
  word.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) != 0) futex_wake_all(&word);
}

// Spin iterations before sleeping: a few microseconds. Longer spins took a core from computing
// workers when processes outnumber cores (measured: staleness and throughput both fell).
constexpr int kSpins = 200;

// Waits until ready() is true: spins briefly (cheap hand-offs stay in user space), then sleeps on
// the futex word in slices of at most `slice` seconds, calling on_idle() between slices.
// Throws TimeoutError after `timeout` seconds and ClosedError once the region is closed.
// ready() may act when it succeeds (claim() takes a slot), so it is never called again after
// returning true.
template <class Ready, class Idle>
void wait_for(const Header* h, std::atomic<uint32_t>& word, std::atomic<uint32_t>& sleepers,
              double timeout, const char* what, Ready ready, Idle on_idle) {
  const auto start = Clock::now();
  for (int i = 0; i < kSpins; ++i) {
    if (ready()) return;
    cpu_relax();
  }
  for (;;) {
    uint32_t seen = word.load(std::memory_order_seq_cst);
    if (ready()) return;
    if (h->closed.load()) throw ClosedError(std::string("region closed while waiting for ") + what);
    double left = timeout - std::chrono::duration<double>(Clock::now() - start).count();
    if (left <= 0) throw TimeoutError(std::string("timed out after ") + std::to_string(timeout) + " s waiting for " + what);
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    const bool done = ready();  // re-checked after announcing the sleep: no wake-up is lost
    if (!done) futex_wait(&word, seen, std::min(left, 0.05));
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
    if (done) return;
    on_idle();
  }
}

// Decides whether the sweep may remove the segment open on fd (read-only, non-blocking). Anything
// that is not a regular file of this user with pyasgd's magic is someone else's business. A
// segment of layout 4 or later is stale when nobody holds its owner's lock (taken here, shared
// and non-blocking: the caller unlinks before closing fd, so a creator that locks after us sees
// its name gone and starts over). Layouts 1-3 never locked: their owner pid is all there is.
bool stale_segment(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid()) return false;
  Identity id{};
  if (static_cast<uint64_t>(st.st_size) >= sizeof(id)) {
    if (pread(fd, &id, sizeof(id), 0) != static_cast<ssize_t>(sizeof(id)) || id.magic != kRegionMagic)
      return false;
    if (id.layout_version >= 1 && id.layout_version <= 3) return pid_dead(id.owner_pid);
  }
  // Shorter than the identity: a creator between open() and its first write, or one that died
  // there; its lock tells which.
  return flock(fd, LOCK_SH | LOCK_NB) == 0;
}

}  // namespace

Mapping::~Mapping() {
  if (base) munmap(base, size);
}

void Region::check_slot(int k, const char* what) const {
  if (k < 0 || static_cast<uint64_t>(k) >= lay_.slots)
    throw std::invalid_argument(std::string(what) + ": slot " + std::to_string(k) +
                                " is out of range (the region has " + std::to_string(lay_.slots) +
                                " slots: 0.." + std::to_string(lay_.slots - 1) + ")");
}

SlotMeta& Region::meta(int k) const {
  return reinterpret_cast<SlotMeta*>(static_cast<char*>(map_->base) + lay_.slot_meta_offset)[k];
}
float* Region::param_ptr(int i) const {
  return reinterpret_cast<float*>(static_cast<char*>(map_->base) + lay_.param_offset[i]);
}
char* Region::slot_ptr(int k) const {
  return static_cast<char*>(map_->base) + lay_.slot_data_offset + k * lay_.slot_stride;
}

uint64_t Region::param_offset(int i) const {
  if (i != 0 && i != 1)
    throw std::invalid_argument("param_offset: buffer " + std::to_string(i) + " does not exist (0 or 1)");
  return lay_.param_offset[i];
}

uint64_t Region::slot_offset(int k) const {
  check_slot(k, "slot_offset");
  return lay_.slot_data_offset + static_cast<uint64_t>(k) * lay_.slot_stride;
}

uint32_t Region::slot_state(int k) const {
  check_slot(k, "slot_state");
  return slot_word::state(meta(k).own.load(std::memory_order_acquire));
}

bool Region::is_owner() const { return creator_pid_ != 0 && creator_pid_ == getpid(); }

std::unique_ptr<Region> Region::create(uint64_t n, uint64_t slots, uint32_t grad_dtype) {
  if (n == 0) throw std::invalid_argument("region needs at least one parameter (n >= 1)");
  if (slots == 0) throw std::invalid_argument("region needs at least one gradient slot (slots >= 1)");
  Layout L;
  std::string why;
  if (!compute_layout(n, slots, grad_dtype, &L, &why)) throw std::invalid_argument("cannot lay out the region: " + why);
  sweep_stale();

  const std::string dir = shm_dir();
  std::random_device rd;
  std::string name, path;
  int fd = -1;
  for (int attempt = 0; attempt < 64 && fd < 0; ++attempt) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "pyasgd-%d-%08x%08x", getpid(), rd(), rd());
    name = buf;
    path = dir + "/" + name;
    fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno == EEXIST) continue;
      if (errno == ENOENT || errno == ENOTDIR)
        throw std::runtime_error("the shared-memory directory " + dir + " does not exist" +
                                 (std::getenv("PYASGD_SHM_DIR") ? " (set by PYASGD_SHM_DIR)" : ""));
      throw std::runtime_error(errno_text("creating the shared region " + path));
    }
    // The lock marks the segment live for the sweeps of other processes from here on. One that
    // opened the file before we locked it may have found it unlocked and unlinked it: the name is
    // then gone (the sweep unlinks before it lets go of its lock), and we start again.
    int rc;
    while ((rc = flock(fd, LOCK_EX)) != 0 && errno == EINTR) {
    }
    if (rc != 0) {
      int e = errno;
      ::unlink(path.c_str());
      ::close(fd);
      errno = e;
      throw std::runtime_error(errno_text("locking the shared region " + path));
    }
    if (!same_file(fd, path)) {
      ::close(fd);
      fd = -1;
    }
  }
  if (fd < 0) throw std::runtime_error("could not create a shared region in " + dir + " (no free name)");
  auto give_up = [&] {  // nothing of a failed create() stays behind
    ::unlink(path.c_str());
    ::close(fd);
  };

  // The identity first (a sweep then knows the file for a locked pyasgd segment), then reserve
  // every byte: on a tmpfs that is too small this fails here, with the numbers, instead of a
  // SIGBUS on first touch of a page hours into the run.
  const Identity id{kRegionMagic, kLayoutVersion, static_cast<int32_t>(getpid())};
  struct statvfs vfs;
  const uint64_t free_bytes = fstatvfs(fd, &vfs) == 0 ? uint64_t{vfs.f_bavail} * vfs.f_frsize : 0;
  int err = pwrite(fd, &id, sizeof(id), 0) == static_cast<ssize_t>(sizeof(id)) ? 0 : errno;
  while (err == 0 && (err = posix_fallocate(fd, 0, static_cast<off_t>(L.total_bytes))) == EINTR) {
  }
  if (err != 0) {
    give_up();
    if (err == ENOSPC || err == ENOMEM || err == EFBIG) throw SpaceError(space_message(dir, L, free_bytes, err));
    throw std::runtime_error("reserving " + mib(L.total_bytes) + " for the shared region in " + dir + ": " + std::strerror(err));
  }
  // Mapped through a second open file description: a mapping holds a reference to the file it
  // was made from, and a flock lasts until the last reference to its file description goes, so
  // mapping the locked one would let a forked child's inherited mapping keep the lock (and a
  // dead owner's segment) alive.
  int map_fd = ::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  void* base = MAP_FAILED;
  if (map_fd >= 0 && same_file(map_fd, path))
    base = mmap(nullptr, L.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
  if (base == MAP_FAILED) {
    int e = errno;
    if (map_fd >= 0) ::close(map_fd);
    give_up();
    errno = e;
    throw std::runtime_error(errno_text("mapping the shared region " + path));
  }
  std::unique_ptr<Region> r(new Region());
  r->map_ = std::make_shared<Mapping>(base, L.total_bytes);
  r->base_fd_ = map_fd;  // kept: the slot locks' description is opened from it (slot_lock_fd)
  r->lock_entry_ = register_owner_lock(fd);
  if (r->lock_entry_ < 0) {
    r.reset();  // closes map_fd
    give_up();
    throw std::runtime_error("one process cannot own more than " + std::to_string(kMaxOwned) + " shared regions");
  }
  r->name_ = name;
  r->path_ = path;
  r->lay_ = L;
  r->creator_pid_ = getpid();
  r->held_.reset(new std::atomic<uint64_t>[slots]());

  // The reserved file is zero-filled: every atomic starts at 0 and every slot FREE (generation 0).
  Header* h = new (base) Header();
  h->layout_version = kLayoutVersion;
  h->owner_pid = getpid();
  h->n = L.n;
  h->slots = L.slots;
  h->param_offset[0] = L.param_offset[0];
  h->param_offset[1] = L.param_offset[1];
  h->slot_meta_offset = L.slot_meta_offset;
  h->slot_data_offset = L.slot_data_offset;
  h->slot_stride = L.slot_stride;
  h->total_bytes = L.total_bytes;
  h->grad_dtype = L.grad_dtype;
  for (uint64_t k = 0; k < slots; ++k)
    new (static_cast<char*>(base) + L.slot_meta_offset + k * sizeof(SlotMeta)) SlotMeta();
  r->h_ = h;
  std::atomic_thread_fence(std::memory_order_release);
  reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->store(kRegionMagic, std::memory_order_release);
  return r;
}

std::unique_ptr<Region> Region::attach(const std::string& name) {
  const std::string bare = !name.empty() && name[0] == '/' ? name.substr(1) : name;  // shm_open style
  if (bare.empty() || bare.find('/') != std::string::npos)
    throw std::invalid_argument("'" + name + "' is not a shared region name (expected pyasgd-...)");
  const std::string path = shm_dir() + "/" + bare;
  int fd = ::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT)
      throw std::invalid_argument("no shared region named '" + bare + "' in " + shm_dir() + " (did its run end, or is the name mistyped?)");
    throw std::runtime_error(errno_text("opening " + path));
  }
  const std::string not_ours = "'" + bare + "' is not a pyasgd shared region";
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) < sizeof(Header)) {
    ::close(fd);
    throw std::invalid_argument(not_ours + " (not a regular file, or too small)");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    int e = errno;
    ::close(fd);
    errno = e;
    throw std::runtime_error(errno_text("mmap(" + path + ")"));
  }
  auto map = std::make_shared<Mapping>(base, size);  // unmapped on any error below
  struct FdGuard {  // closed on any error below; kept for the slot locks once attached
    int fd;
    ~FdGuard() { if (fd >= 0) ::close(fd); }
  } guard{fd};

  // Everything the region will ever index with comes from this check, made once: the header
  // must be exactly the layout its own n, slots and grad_dtype give, and that layout exactly the file.
  Header* h = static_cast<Header*>(base);
  if (reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->load(std::memory_order_acquire) != kRegionMagic)
    throw std::invalid_argument(not_ours + " (wrong magic)");
  const std::string bad = not_ours + " of layout " + std::to_string(kLayoutVersion) + ": ";
  if (h->layout_version != kLayoutVersion)
    throw std::invalid_argument(bad + "its header has layout " + std::to_string(h->layout_version) +
                                " (made by another version of pyasgd?)");
  const uint64_t n = h->n, slots = h->slots, total = h->total_bytes;
  const uint32_t grad_dtype = h->grad_dtype;
  if (total != size)
    throw std::invalid_argument(bad + "header field total_bytes = " + std::to_string(total) +
                                " but the segment has " + std::to_string(size) + " bytes");
  Layout L;
  std::string why;
  if (!compute_layout(n, slots, grad_dtype, &L, &why)) throw std::invalid_argument(bad + "header field " + why);
  if (L.total_bytes != size)
    throw std::invalid_argument(bad + "header fields n = " + std::to_string(n) + ", slots = " +
                                std::to_string(slots) + " and grad_dtype = " + std::to_string(grad_dtype) +
                                " need " + std::to_string(L.total_bytes) + " bytes but the segment has " +
                                std::to_string(size));
  const struct {
    const char* field;
    uint64_t got, want;
  } fields[] = {{"param_offset[0]", h->param_offset[0], L.param_offset[0]},
                {"param_offset[1]", h->param_offset[1], L.param_offset[1]},
                {"slot_meta_offset", h->slot_meta_offset, L.slot_meta_offset},
                {"slot_data_offset", h->slot_data_offset, L.slot_data_offset},
                {"slot_stride", h->slot_stride, L.slot_stride}};
  for (const auto& f : fields)
    if (f.got != f.want)
      throw std::invalid_argument(bad + "header field " + f.field + " = " + std::to_string(f.got) +
                                  ", expected " + std::to_string(f.want) + " for n = " +
                                  std::to_string(n) + ", slots = " + std::to_string(slots) +
                                  ", grad_dtype = " + std::to_string(grad_dtype));

  std::unique_ptr<Region> r(new Region());
  r->name_ = bare;
  r->path_ = path;
  r->map_ = std::move(map);
  r->base_fd_ = guard.fd;
  guard.fd = -1;
  r->h_ = h;
  r->lay_ = L;
  r->held_.reset(new std::atomic<uint64_t>[slots]());
  return r;
}

int Region::sweep_stale() {
  const std::string dir = shm_dir();
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  int removed = 0;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, "pyasgd-", 7) != 0) continue;
    const std::string path = dir + "/" + e->d_name;
    // Non-blocking (opening a FIFO for reading would wait for a writer), not through links.
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) continue;
    // Unlinked while the lock is held, and only if the name still is the file judged.
    if (stale_segment(fd) && same_file(fd, path) && ::unlink(path.c_str()) == 0) ++removed;
    ::close(fd);
  }
  closedir(d);
  return removed;
}

Region::~Region() {
  if (is_owner()) {
    unlink();
    release_owner_lock(lock_entry_);  // after the unlink: no sweep ever sees it unlocked
  }
  if (lock_fd_ >= 0 && lock_pid_ == getpid()) release_owner_lock(lock_entry_slots_);  // closes it
  if (base_fd_ >= 0) ::close(base_fd_);
  // map_ goes with the last view of the memory (see Mapping).
}

void Region::unlink() {
  if (!unlinked_) {
    ::unlink(path_.c_str());
    unlinked_ = true;
  }
}

void Region::close() {
  h_->closed.store(1);
  futex_wake_all(&h_->ready_word);
  futex_wake_all(&h_->free_word);
  futex_wake_all(&h_->version_word);
  futex_wake_all(&h_->ack_word);
}

// --- parameters --------------------------------------------------------------------------------

int Region::front_index() const {
  return static_cast<int>(h_->published.load(std::memory_order_acquire) & 1);
}

int Region::begin_write() {
  int back = static_cast<int>((h_->published.load(std::memory_order_acquire) & 1) ^ 1);
  uint64_t s = h_->buf_seq[back].load(std::memory_order_relaxed);
  // Odd: readers of it will retry. Already odd: a writer died mid-write, and it stays odd.
  if ((s & 1) == 0) h_->buf_seq[back].store(s + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // before any byte of the new data
  return back;
}

uint64_t Region::end_write(bool publish) {
  uint64_t pub = h_->published.load(std::memory_order_acquire);
  int back = static_cast<int>((pub & 1) ^ 1);
  uint64_t s = h_->buf_seq[back].load(std::memory_order_relaxed);
  if ((s & 1) == 0) throw std::runtime_error("end_write without begin_write");
  uint64_t version = pub >> 1;
  if (publish) version += 1;
  // The stamp is written while the sequence is still odd, so readers see it under the seqlock.
  // A write that is not published leaves data that is no version at all: invalid, never copied.
  h_->buf_version[back].store(publish ? version : kInvalidVersion, std::memory_order_relaxed);
  h_->buf_seq[back].store(s + 1, std::memory_order_release);  // even: stamp and data before it
  if (publish) {
    h_->published.store((version << 1) | static_cast<uint64_t>(back), std::memory_order_release);
    bump_and_wake(h_->version_word, h_->version_sleepers);
  }
  return version;
}

void Region::read_begin(uint64_t* version, int* index, uint64_t* seq) const {
  for (;;) {
    const uint64_t pub = h_->published.load(std::memory_order_acquire);
    const int idx = static_cast<int>(pub & 1);
    test_delay("read");
    const uint64_t s = h_->buf_seq[idx].load(std::memory_order_acquire);
    if (s & 1) {  // only when the server lapped us: it is rewriting what we were told is current
      cpu_relax();
      continue;
    }
    const uint64_t v = h_->buf_version[idx].load(std::memory_order_acquire);  // what it holds
    // Since `pub` was read, the buffer became the back buffer and was rewritten without being
    // published: what it holds is no version (and never older than what was published then).
    if (v == kInvalidVersion || v < (pub >> 1)) {
      cpu_relax();
      continue;
    }
    *version = v;
    *index = idx;
    *seq = s;
    return;
  }
}

bool Region::read_validate(int index, uint64_t seq) const {
  if (index != 0 && index != 1) throw std::invalid_argument("read_validate: buffer index must be 0 or 1");
  std::atomic_thread_fence(std::memory_order_acquire);  // the copy happens before this check
  return h_->buf_seq[index].load(std::memory_order_relaxed) == seq;
}

uint64_t Region::pull_cpu(float* dst) const {
  for (;;) {
    uint64_t version, seq;
    int idx;
    read_begin(&version, &idx, &seq);
    parallel_copy(dst, param_ptr(idx), lay_.n);
    if (read_validate(idx, seq)) return version;
  }
}

uint64_t Region::wait_version(uint64_t above, double timeout) {
  wait_for(h_, h_->version_word, h_->version_sleepers, timeout, "a new parameter version",
           [&] { return version() > above; }, [] {});
  return version();
}

// --- gradient ring -------------------------------------------------------------------------------

// Slot locks. A pusher takes an exclusive byte-range lock on byte kSlotLockBase + k of the
// segment (an open-file-description lock, F_OFD_SETLK: owned by its own open of the file, not by
// a pid) before it claims slot k, and lets go only after its commit or abandon has moved the slot
// out of WRITING. The kernel drops the lock when the pusher dies, however it dies. So a WRITING
// slot whose lock is free has a dead writer, and one whose lock is held has a live one: a
// reclaimer asks the lock, never the pid, and pid reuse (or a pusher in another PID namespace)
// can neither keep a dead pusher's slot from being reclaimed nor free a live pusher's slot.
// These locks are independent of the owner's flock on the file (Linux keeps the two apart).
// The locks live on a description of their own, opened on first use by each process (never the
// mapping's, which a forked child inherits with the mapping) and registered like the owner's
// flock fd, so a forked child closes its inherited copy at once and a dead pusher's locks go with
// it, whatever children it forked. Within one process the locks do not exclude each other: held_
// does (kBusy while this object claims, reclaims, commits or abandons a slot).
constexpr off_t kSlotLockBase = off_t{1} << 40;  // beyond any segment: locks need no bytes
constexpr uint64_t kBusy = ~uint64_t{0};

int Region::slot_lock_fd() {
  const int me = getpid();
  if (lock_pid_ != me || lock_fd_ < 0) {
    const std::string self = "/proc/self/fd/" + std::to_string(base_fd_);
    int fd = ::open(self.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error(errno_text("opening the shared region " + path_ + " for its slot locks"));
    int entry = register_owner_lock(fd);
    if (entry < 0) {
      ::close(fd);
      throw std::runtime_error("one process cannot hold more than " + std::to_string(kMaxOwned) + " shared regions");
    }
    lock_fd_ = fd;
    lock_entry_slots_ = entry;
    lock_pid_ = me;
  }
  return lock_fd_;
}

struct flock slot_lock_request(int k, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = kSlotLockBase + k;
  fl.l_len = 1;
  return fl;
}

bool Region::try_lock_slot(int k) {
  struct flock fl = slot_lock_request(k, F_WRLCK);
  const int fd = slot_lock_fd();
  for (;;) {
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
    if (errno == EAGAIN || errno == EACCES) return false;
    if (errno != EINTR) throw std::runtime_error(errno_text("locking gradient slot " + std::to_string(k)));
  }
}

void Region::unlock_slot(int k) {
  struct flock fl = slot_lock_request(k, F_UNLCK);
  fcntl(slot_lock_fd(), F_OFD_SETLK, &fl);  // cannot fail for a lock we hold
}

std::vector<Reclaimed> Region::reclaim_dead() {
  using namespace slot_word;
  std::vector<Reclaimed> out;
  for (uint64_t k = 0; k < lay_.slots; ++k) {
    SlotMeta& s = meta(static_cast<int>(k));
    uint64_t w = s.own.load(std::memory_order_acquire);
    // A slot this object holds is ours and alive (and our own description's lock would not
    // stop us: a lock never conflicts with its owner).
    if (state(w) != kWriting) continue;
    uint64_t none = 0;
    if (!held_[k].compare_exchange_strong(none, kBusy, std::memory_order_acq_rel)) continue;
    const int worker = s.worker;
    test_delay("reclaim");
    // Its writer holds the slot's lock for as long as it writes: taking it proves the writer
    // dead, and holding it keeps claimers off until the slot is FREE.
    if (!try_lock_slot(static_cast<int>(k))) {
      held_[k].store(0, std::memory_order_release);
      continue;
    }
    // From the exact word seen: if another reclaimer freed it and a live pusher claimed it
    // meanwhile, the generation differs and this fails.
    if (s.own.compare_exchange_strong(w, make(kFree, gen(w), 0), std::memory_order_acq_rel)) {
      h_->reclaimed.fetch_add(1);
      out.push_back({static_cast<int>(k), pid(w), worker});
    }
    unlock_slot(static_cast<int>(k));
    held_[k].store(0, std::memory_order_release);
  }
  if (!out.empty()) bump_and_wake(h_->free_word, h_->free_sleepers);
  return out;
}

int Region::claim(int worker, double timeout) {
  using namespace slot_word;
  const int me = getpid();
  const uint64_t K = lay_.slots;
  // Start the scan at a per-worker offset so pushers rarely contend for the same slot.
  const uint64_t start = static_cast<uint64_t>(worker < 0 ? me : worker) % K;
  int got = -1;
  auto try_claim = [&] {
    for (uint64_t i = 0; i < K; ++i) {
      int k = static_cast<int>((start + i) % K);
      SlotMeta& s = meta(k);
      uint64_t w = s.own.load(std::memory_order_relaxed);
      if (state(w) != kFree) continue;
      uint64_t none = 0;  // another thread of this object is at this slot: not ours to take
      if (!held_[k].compare_exchange_strong(none, kBusy, std::memory_order_acq_rel)) continue;
      // The slot's lock first (held until the slot leaves WRITING: see "Slot locks"); one held
      // by someone else on a FREE slot is a claimer or reclaimer in the middle of its step.
      if (!try_lock_slot(k)) {
        held_[k].store(0, std::memory_order_release);
        continue;
      }
      w = s.own.load(std::memory_order_relaxed);
      // State, a new generation and our pid in one step: there is no moment at which the slot is
      // WRITING under someone else's (possibly dead) pid.
      const uint64_t mine = make(kWriting, gen(w) + 1, static_cast<uint32_t>(me));
      if (state(w) == kFree && s.own.compare_exchange_strong(w, mine, std::memory_order_acquire)) {
        held_[k].store(mine, std::memory_order_release);
        test_delay("claim");
        s.worker = worker;
        got = k;
        return true;
      }
      unlock_slot(k);
      held_[k].store(0, std::memory_order_release);
    }
    return false;
  };
  wait_for(h_, h_->free_word, h_->free_sleepers, timeout,
           "a free gradient slot (every slot is taken: is the server running?)", try_claim,
           [&] { reclaim_dead(); });
  return got;
}

// The ownership word this process's claim installed on `slot`, given up by this call: a slot can
// be committed or abandoned once, and only by the process that claimed it. held_ stays non-zero
// (kBusy) until the caller has moved the slot out of WRITING and let go of its lock, so this
// object's own reclaim_dead never takes it meanwhile.

uint64_t Region::take_held(int slot, const char* what) {
  check_slot(slot, what);
  uint64_t w = held_[slot].exchange(kBusy, std::memory_order_acq_rel);
  if (w == kBusy) w = 0;  // another thread is committing or abandoning it
  else if (w == 0) held_[slot].store(0, std::memory_order_release);
  if (w == 0)
    throw std::runtime_error(std::string(what) + ": slot " + std::to_string(slot) +
                             " is not held by this process (never claimed here, or already committed or abandoned)");
  return w;
}

Ticket Region::commit(int slot, uint64_t version, uint64_t tokens, double loss, float bound,
                      uint64_t position) {
  using namespace slot_word;
  uint64_t w = take_held(slot, "commit");
  SlotMeta& s = meta(slot);
  s.bound = bound;
  s.version = version;
  s.tokens = tokens;
  s.loss = loss;
  s.position = position;
  s.push_seq = h_->push_seq.fetch_add(1, std::memory_order_relaxed);
  Ticket t{s.push_seq, slot, s.acks.load(std::memory_order_relaxed)};
  // Data and metadata before READY (release). Fails only if the slot was taken from us.
  const bool ok = s.own.compare_exchange_strong(w, make(kReady, gen(w), static_cast<uint32_t>(pid(w))),
                                                std::memory_order_release);
  unlock_slot(slot);  // out of WRITING: a reclaimer may look now
  held_[slot].store(0, std::memory_order_release);
  if (!ok)
    throw std::runtime_error("commit: slot " + std::to_string(slot) +
                             " was reclaimed from this process while it wrote; the gradient is lost");
  bump_and_wake(h_->ready_word, h_->ready_sleepers);
  return t;
}

void Region::ack(const std::vector<int>& slots) {
  for (int k : slots) check_slot(k, "ack");
  for (int k : slots) meta(k).acks.fetch_add(1, std::memory_order_release);
  bump_and_wake(h_->ack_word, h_->ack_sleepers);
}

void Region::wait_ack(const Ticket& t, double timeout) {
  check_slot(t.slot, "wait_ack");
  SlotMeta& s = meta(t.slot);
  wait_for(h_, h_->ack_word, h_->ack_sleepers, timeout, "the server to take the gradient",
           [&] { return s.acks.load(std::memory_order_acquire) != t.acks; }, [] {});
}

void Region::abandon(int slot) {
  using namespace slot_word;
  uint64_t w = take_held(slot, "abandon");
  const bool freed = meta(slot).own.compare_exchange_strong(w, make(kFree, gen(w), 0), std::memory_order_release);
  unlock_slot(slot);
  held_[slot].store(0, std::memory_order_release);
  if (freed) bump_and_wake(h_->free_word, h_->free_sleepers);
  // else: already reclaimed (and perhaps claimed again by another pusher): nothing of ours to free
}

Ticket Region::push_cpu(const float* src, int worker, uint64_t version, uint64_t tokens,
                        double loss, uint64_t position, double timeout) {
  int k = claim(worker, timeout);
  float bound;
  try {  // the copy measures the bound for free (of the rounded values, in a bf16 region)
    bound = lay_.grad_dtype == kGradBF16
                ? copy_bf16_absmax_cpu(reinterpret_cast<uint16_t*>(slot_ptr(k)), src, lay_.n)
                : copy_absmax_cpu(reinterpret_cast<float*>(slot_ptr(k)), src, lay_.n);
  } catch (...) {  // e.g. the thread pool could not start a thread: give the claim back
    abandon(k);
    throw;
  }
  return commit(k, version, tokens, loss, bound, position);
}

std::vector<Collected> Region::collect(int G, double timeout, std::vector<Reclaimed>* reclaimed) {
  using namespace slot_word;
  if (G < 1 || static_cast<uint64_t>(G) > lay_.slots)
    throw std::invalid_argument("collect: G must be between 1 and the number of slots (" + std::to_string(lay_.slots) + ")");
  std::vector<std::pair<Collected, uint64_t>> ready;  // with the READY word each was seen in
  auto enough = [&] {
    ready.clear();
    for (uint64_t k = 0; k < lay_.slots; ++k) {
      SlotMeta& s = meta(static_cast<int>(k));
      uint64_t w = s.own.load(std::memory_order_acquire);  // READY: its metadata is visible
      if (state(w) == kReady)
        ready.push_back({{static_cast<int>(k), s.worker, s.version, s.tokens, s.push_seq, s.loss, s.bound, s.position}, w});
    }
    return ready.size() >= static_cast<size_t>(G);
  };
  wait_for(h_, h_->ready_word, h_->ready_sleepers, timeout, "gradients from the workers", enough,
           [&] {
             auto r = reclaim_dead();
             if (reclaimed) reclaimed->insert(reclaimed->end(), r.begin(), r.end());
           });
  std::sort(ready.begin(), ready.end(),
            [](const auto& a, const auto& b) { return a.first.push_seq < b.first.push_seq; });
  ready.resize(G);  // the G earliest arrivals
  std::vector<Collected> out;
  for (auto& [c, w] : ready) {
    // Only the single consumer moves a READY slot, so this cannot fail unless two servers
    // collect from one region.
    if (!meta(c.slot).own.compare_exchange_strong(w, make(kReading, gen(w), static_cast<uint32_t>(pid(w))),
                                                  std::memory_order_acq_rel))
      throw std::runtime_error("collect: slot " + std::to_string(c.slot) +
                               " changed while being collected (is a second server collecting?)");
    out.push_back(c);
  }
  return out;
}

void Region::release(const std::vector<int>& slots) {
  using namespace slot_word;
  // Checked whole before anything changes: only READING slots (the server's) may be freed; a
  // stray index or a second release must not free a slot a pusher is writing.
  std::vector<uint64_t> words;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int k = slots[i];
    check_slot(k, "release");
    if (std::find(slots.begin(), slots.begin() + i, k) != slots.begin() + i)
      throw std::invalid_argument("release: slot " + std::to_string(k) + " is listed twice");
    uint64_t w = meta(k).own.load(std::memory_order_acquire);
    if (state(w) != kReading)
      throw std::runtime_error("release: slot " + std::to_string(k) + " is not being read by the server (state " +
                               std::to_string(state(w)) + "): released twice, or never collected?");
    words.push_back(w);
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    SlotMeta& s = meta(slots[i]);
    s.acks.fetch_add(1, std::memory_order_relaxed);  // released implies processed
    s.own.compare_exchange_strong(words[i], make(kFree, gen(words[i]), 0), std::memory_order_release);
  }
  bump_and_wake(h_->free_word, h_->free_sleepers);
  bump_and_wake(h_->ack_word, h_->ack_sleepers);
}

}  // namespace pyasgd
