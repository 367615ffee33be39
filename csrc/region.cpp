// The shared region (see region.h for the protocol).
#include "region.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
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

constexpr size_t kAlign = 4096;  // page-aligned buffers: DMA-friendly and 64-byte aligned for SIMD
size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

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

}  // namespace

SlotMeta& Region::meta(int k) const {
  return reinterpret_cast<SlotMeta*>(static_cast<char*>(base_) + h_->slot_meta_offset)[k];
}
float* Region::param_ptr(int i) const {
  return reinterpret_cast<float*>(static_cast<char*>(base_) + h_->param_offset[i]);
}
float* Region::slot_ptr(int k) const {
  return reinterpret_cast<float*>(static_cast<char*>(base_) + slot_offset(k));
}

std::unique_ptr<Region> Region::create(uint64_t n, uint64_t slots) {
  if (n == 0) throw std::invalid_argument("region needs at least one parameter (n >= 1)");
  if (slots == 0) throw std::invalid_argument("region needs at least one gradient slot (slots >= 1)");
  sweep_stale();
  const size_t buf = round_up(n * sizeof(float));
  const size_t header = round_up(sizeof(Header));
  const size_t metas = round_up(slots * sizeof(SlotMeta));
  const size_t total = header + 2 * buf + metas + slots * buf;

  std::random_device rd;
  const std::string dir = shm_dir();
  std::unique_ptr<Region> r(new Region());
  int fd = -1;
  for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
    char name[64];
    std::snprintf(name, sizeof(name), "pyasgd-%d-%08x%08x", getpid(), rd(), rd());
    std::string path = dir + "/" + name;
    fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd >= 0) {
      r->name_ = name;
      r->path_ = path;
    } else if (errno != EEXIST) {
      throw std::runtime_error(errno_text("creating the shared region " + path));
    }
  }
  if (fd < 0) throw std::runtime_error("could not find a free shared-memory name in " + dir);
  r->owner_ = true;
  if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
    int e = errno;
    ::close(fd);
    ::unlink(r->path_.c_str());
    errno = e;
    throw std::runtime_error(errno_text("ftruncate of shared region to " + std::to_string(total) + " bytes (is /dev/shm large enough?)"));
  }
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) {
    ::unlink(r->path_.c_str());
    throw std::runtime_error(errno_text("mmap of shared region"));
  }
  r->base_ = base;
  r->size_ = total;
  // The file is zero-filled: every atomic starts at 0 and every slot FREE.
  Header* h = new (base) Header();
  h->layout_version = kLayoutVersion;
  h->owner_pid = getpid();
  h->n = n;
  h->slots = slots;
  h->param_offset[0] = header;
  h->param_offset[1] = header + buf;
  h->slot_meta_offset = header + 2 * buf;
  h->slot_data_offset = header + 2 * buf + metas;
  h->slot_stride = buf;
  h->total_bytes = total;
  for (uint64_t k = 0; k < slots; ++k)
    new (static_cast<char*>(base) + h->slot_meta_offset + k * sizeof(SlotMeta)) SlotMeta();
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
  int fd = ::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      throw std::invalid_argument("no shared region named '" + bare + "' in " + shm_dir() + " (did its run end, or is the name mistyped?)");
    throw std::runtime_error(errno_text("opening " + path));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(Header)) {
    ::close(fd);
    throw std::invalid_argument("'" + bare + "' is not a pyasgd shared region (too small)");
  }
  void* base = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) throw std::runtime_error(errno_text("mmap(" + path + ")"));
  Header* h = static_cast<Header*>(base);
  if (reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->load(std::memory_order_acquire) != kRegionMagic ||
      h->layout_version != kLayoutVersion || h->total_bytes != static_cast<uint64_t>(st.st_size)) {
    munmap(base, st.st_size);
    throw std::invalid_argument("'" + bare + "' is not a pyasgd shared region of layout " +
                                std::to_string(kLayoutVersion) + " (wrong magic, layout or size)");
  }
  std::unique_ptr<Region> r(new Region());
  r->name_ = bare;
  r->path_ = path;
  r->base_ = base;
  r->size_ = st.st_size;
  r->h_ = h;
  return r;
}

int Region::sweep_stale() {
  int removed = 0;
  const std::string dir = shm_dir();
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, "pyasgd-", 7) != 0) continue;
    std::string path = dir + "/" + e->d_name;
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st;
    bool stale = false;
    if (fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= sizeof(Header)) {
      void* p = mmap(nullptr, sizeof(Header), PROT_READ, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED) {
        const Header* h = static_cast<const Header*>(p);
        stale = h->magic == kRegionMagic && pid_dead(h->owner_pid);
        munmap(p, sizeof(Header));
      }
    }
    ::close(fd);
    if (stale && ::unlink(path.c_str()) == 0) ++removed;
  }
  closedir(d);
  return removed;
}

Region::~Region() {
  if (owner_) unlink();
  if (base_) munmap(base_, size_);
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

int Region::begin_write() {
  int back = static_cast<int>((h_->published.load(std::memory_order_acquire) & 1) ^ 1);
  h_->buf_seq[back].fetch_add(1, std::memory_order_relaxed);  // odd: readers of it will retry
  std::atomic_thread_fence(std::memory_order_seq_cst);       // before any byte of the new data
  return back;
}

uint64_t Region::end_write(bool publish) {
  uint64_t pub = h_->published.load(std::memory_order_acquire);
  int back = static_cast<int>((pub & 1) ^ 1);
  uint64_t version = pub >> 1;
  if (publish) {
    version += 1;
    h_->buf_version[back].store(version, std::memory_order_relaxed);
  }
  h_->buf_seq[back].fetch_add(1, std::memory_order_release);  // even: consistent again
  if (publish) {
    h_->published.store((version << 1) | static_cast<uint64_t>(back), std::memory_order_release);
    bump_and_wake(h_->version_word, h_->version_sleepers);
  }
  return version;
}

void Region::read_begin(uint64_t* version, int* index, uint64_t* seq) const {
  for (;;) {
    int idx = static_cast<int>(h_->published.load(std::memory_order_acquire) & 1);
    test_delay("read");
    uint64_t s = h_->buf_seq[idx].load(std::memory_order_acquire);
    if (s & 1) {  // only when the server lapped us: it is rewriting what we were told is current
      cpu_relax();
      continue;
    }
    *version = h_->buf_version[idx].load(std::memory_order_acquire);  // what this buffer holds
    *index = idx;
    *seq = s;
    return;
  }
}

bool Region::read_validate(int index, uint64_t seq) const {
  std::atomic_thread_fence(std::memory_order_acquire);  // the copy happens before this check
  return h_->buf_seq[index].load(std::memory_order_relaxed) == seq;
}

uint64_t Region::pull_cpu(float* dst) const {
  for (;;) {
    uint64_t version, seq;
    int idx;
    read_begin(&version, &idx, &seq);
    parallel_copy(dst, param_ptr(idx), h_->n);
    if (read_validate(idx, seq)) return version;
  }
}

uint64_t Region::wait_version(uint64_t above, double timeout) {
  wait_for(h_, h_->version_word, h_->version_sleepers, timeout, "a new parameter version",
           [&] { return version() > above; }, [] {});
  return version();
}

// --- gradient ring -------------------------------------------------------------------------------

std::vector<Reclaimed> Region::reclaim_dead() {
  std::vector<Reclaimed> out;
  for (uint64_t k = 0; k < h_->slots; ++k) {
    SlotMeta& s = meta(static_cast<int>(k));
    if (s.state.load(std::memory_order_acquire) != kWriting || !pid_dead(s.owner_pid)) continue;
    test_delay("reclaim");
    uint32_t expected = kWriting;
    int pid = s.owner_pid, worker = s.worker;
    if (s.state.compare_exchange_strong(expected, kFree)) {
      h_->reclaimed.fetch_add(1);
      out.push_back({static_cast<int>(k), pid, worker});
    }
  }
  if (!out.empty()) bump_and_wake(h_->free_word, h_->free_sleepers);
  return out;
}

int Region::claim(int worker, double timeout) {
  const int pid = getpid();
  const uint64_t K = h_->slots;
  // Start the scan at a per-worker offset so pushers rarely contend for the same slot.
  const uint64_t start = static_cast<uint64_t>(worker < 0 ? pid : worker) % K;
  int got = -1;
  auto try_claim = [&] {
    for (uint64_t i = 0; i < K; ++i) {
      int k = static_cast<int>((start + i) % K);
      SlotMeta& s = meta(k);
      uint32_t expected = kFree;
      if (s.state.load(std::memory_order_relaxed) == kFree &&
          s.state.compare_exchange_strong(expected, kWriting, std::memory_order_acquire)) {
        test_delay("claim");
        s.owner_pid = pid;
        s.worker = worker;
        got = k;
        return true;
      }
    }
    return false;
  };
  wait_for(h_, h_->free_word, h_->free_sleepers, timeout,
           "a free gradient slot (every slot is taken: is the server running?)", try_claim,
           [&] { reclaim_dead(); });
  return got;
}

Ticket Region::commit(int slot, uint64_t version, uint64_t tokens, double loss, float bound) {
  SlotMeta& s = meta(slot);
  s.bound = bound;
  s.version = version;
  s.tokens = tokens;
  s.loss = loss;
  s.push_seq = h_->push_seq.fetch_add(1, std::memory_order_relaxed);
  Ticket t{s.push_seq, slot, s.acks.load(std::memory_order_relaxed)};
  s.state.store(kReady, std::memory_order_release);  // data and metadata before READY
  bump_and_wake(h_->ready_word, h_->ready_sleepers);
  return t;
}

void Region::ack(const std::vector<int>& slots) {
  for (int k : slots) meta(k).acks.fetch_add(1, std::memory_order_release);
  bump_and_wake(h_->ack_word, h_->ack_sleepers);
}

void Region::wait_ack(const Ticket& t, double timeout) {
  SlotMeta& s = meta(t.slot);
  wait_for(h_, h_->ack_word, h_->ack_sleepers, timeout, "the server to take the gradient",
           [&] { return s.acks.load(std::memory_order_acquire) != t.acks; }, [] {});
}

void Region::abandon(int slot) {
  meta(slot).state.store(kFree, std::memory_order_release);
  bump_and_wake(h_->free_word, h_->free_sleepers);
}

Ticket Region::push_cpu(const float* src, int worker, uint64_t version, uint64_t tokens,
                        double loss, double timeout) {
  int k = claim(worker, timeout);
  float bound = copy_absmax_cpu(slot_ptr(k), src, h_->n);  // the copy measures the bound for free
  return commit(k, version, tokens, loss, bound);
}

std::vector<Collected> Region::collect(int G, double timeout, std::vector<Reclaimed>* reclaimed) {
  if (G < 1 || static_cast<uint64_t>(G) > h_->slots)
    throw std::invalid_argument("collect: G must be between 1 and the number of slots (" + std::to_string(h_->slots) + ")");
  std::vector<Collected> ready;
  auto enough = [&] {
    ready.clear();
    for (uint64_t k = 0; k < h_->slots; ++k) {
      SlotMeta& s = meta(static_cast<int>(k));
      if (s.state.load(std::memory_order_acquire) == kReady)
        ready.push_back({static_cast<int>(k), s.worker, s.version, s.tokens, s.push_seq, s.loss, s.bound});
    }
    return ready.size() >= static_cast<size_t>(G);
  };
  wait_for(h_, h_->ready_word, h_->ready_sleepers, timeout, "gradients from the workers", enough,
           [&] {
             auto r = reclaim_dead();
             if (reclaimed) reclaimed->insert(reclaimed->end(), r.begin(), r.end());
           });
  std::sort(ready.begin(), ready.end(),
            [](const Collected& a, const Collected& b) { return a.push_seq < b.push_seq; });
  ready.resize(G);  // the G earliest arrivals
  for (auto& c : ready) meta(c.slot).state.store(kReading, std::memory_order_relaxed);
  return ready;
}

void Region::release(const std::vector<int>& slots) {
  for (int k : slots) {
    meta(k).acks.fetch_add(1, std::memory_order_relaxed);  // released implies processed
    meta(k).state.store(kFree, std::memory_order_release);
  }
  bump_and_wake(h_->free_word, h_->free_sleepers);
  bump_and_wake(h_->ack_word, h_->ack_sleepers);
}

}  // namespace pyasgd
