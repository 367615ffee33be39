// The shared region: one shared-memory segment per run (a file in /dev/shm, or PYASGD_SHM_DIR)
// holding a header of atomics, the published parameters (two fp32 buffers, each behind its own
// seqlock) and a ring of K gradient slots (fp32, or bf16: the region's gradient type, fixed at
// create and checked on attach).
//
// Parameters: the server writes the buffer that is not published (begin_write/end_write) and
// then flips the published word (version << 1 | buffer). Being the only writer, the server may
// also read the published (front) buffer in place (front_index): a CPU server keeps no master
// copy, it reads the front buffer and writes the new parameters straight into the back one. A reader copies the published buffer
// and validates that buffer's sequence number afterwards: an odd or changed number means the
// server started overwriting it (the reader fell a whole update behind) and the copy is retried.
// A buffer's version stamp is written while its sequence is odd, so it is read under the same
// seqlock as the data; a write that is not published (end_write(false)) stamps the buffer
// invalid, so a reader that picked it before it became the back buffer retries instead of
// returning half-written data under an old version. Readers never block the server, a pull
// never returns a mix of two versions, and the versions one reader sees never go backwards.
//
// Gradient slots: each slot's ownership is one 64-bit word {state, generation, pid}, and every
// transition is a compare-and-swap from the exact word the actor observed:
//   FREE -> WRITING   claim: any pusher; new generation and its pid in the same CAS
//   WRITING -> READY  commit: the pusher, from the word its claim installed
//   WRITING -> FREE   abandon: the pusher, likewise; reclaim: anyone, from the word in which it
//                     saw a dead pid (a slot re-claimed meanwhile has another generation)
//   READY -> READING  collect: the single consumer (the server)
//   READING -> FREE   release: the server
// So two reclaimers, or a reclaimer racing a claimer, can never free a slot a live pusher holds,
// and a second commit (or an abandon after commit) cannot change a slot the server is reading.
// Waiting spins briefly, then sleeps on a futex; wakers only make the syscall when someone sleeps.
//
// Lifetime: the creator (owner) keeps the segment's file open and flock()ed for the region's
// life; the stale-segment sweep removes only segments nobody holds that lock on, so liveness does
// not depend on pids (wrong across PID namespaces). Attachers never take the lock and forked
// children drop it (pthread_atfork), so only the owner process keeps a segment alive: if the
// launcher dies while workers still run, the next create() removes the name; the workers keep
// their mapping (a mapped file outlives its name) until they exit. The mapping itself is shared
// (std::shared_ptr) with every buffer view handed out, so views never dangle.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyasgd {

constexpr uint64_t kRegionMagic = 0x3130445347534150ULL;  // "PASGSD01" little-endian
// 4: one ownership word per slot, flock liveness; 5: position; 6: the slots' gradient type;
// 7: a pusher holds a byte-range lock on its slot while it writes (reclaim by lock, not pid)
constexpr uint32_t kLayoutVersion = 7;
constexpr uint64_t kMaxSlots = 1 << 16;  // slot indices are ints; real rings hold tens
constexpr uint64_t kInvalidVersion = ~0ULL;  // buf_version of a buffer holding a failed write

enum SlotState : uint32_t { kFree = 0, kWriting = 1, kReady = 2, kReading = 3 };

// What a gradient slot holds: fp32, or bf16 (pushers round to nearest even while copying in;
// the server widens exactly and sums in fp32). Stored in the header as a uint32.
enum GradDtype : uint32_t { kGradF32 = 0, kGradBF16 = 1 };
constexpr uint64_t grad_bytes(uint32_t dtype) { return dtype == kGradBF16 ? 2 : 4; }

// The ownership word: state in bits 0-7, generation (bumped by every claim) in bits 8-31,
// pid of the pusher that claimed it in bits 32-63 (0 when FREE).
namespace slot_word {
constexpr uint64_t make(uint32_t state, uint32_t gen, uint32_t pid) {
  return uint64_t{state} | (uint64_t{gen & 0xFFFFFFu} << 8) | (uint64_t{pid} << 32);
}
constexpr uint32_t state(uint64_t w) { return static_cast<uint32_t>(w & 0xFF); }
constexpr uint32_t gen(uint64_t w) { return static_cast<uint32_t>((w >> 8) & 0xFFFFFF); }
constexpr int pid(uint64_t w) { return static_cast<int>(static_cast<uint32_t>(w >> 32)); }
}  // namespace slot_word

struct alignas(64) SlotMeta {
  std::atomic<uint64_t> own;  // {state, generation, pid}, see slot_word
  int32_t worker;     // written by the claimer after its CAS: informational (reclaim reports)
  float bound;        // max |g| measured while copying in (+inf: not finite; < 0: unknown)
  uint64_t version;   // parameter version the gradient was computed from
  uint64_t tokens;
  uint64_t push_seq;  // arrival order, unique per region
  double loss;
  uint64_t position;  // the pusher's data position after this gradient (opaque here: Cursor.pack)
  std::atomic<uint32_t> acks;  // ++ when the server has processed what the slot held
};

struct alignas(64) Header {
  uint64_t magic;
  uint32_t layout_version;
  int32_t owner_pid;  // informational only: liveness is the owner's flock (see above)
  uint64_t n;         // parameters (fp32 elements)
  uint64_t slots;     // K
  uint64_t param_offset[2];
  uint64_t slot_meta_offset;
  uint64_t slot_data_offset;
  uint64_t slot_stride;  // bytes between slot buffers
  uint64_t total_bytes;
  uint32_t grad_dtype;   // GradDtype of every slot
  alignas(64) std::atomic<uint64_t> published;  // version << 1 | buffer index
  alignas(64) std::atomic<uint64_t> buf_seq[2];  // seqlocks: odd while being written
  std::atomic<uint64_t> buf_version[2];          // version each buffer holds (kInvalidVersion)
  alignas(64) std::atomic<uint64_t> push_seq;
  std::atomic<uint64_t> reclaimed;
  std::atomic<uint32_t> closed;
  alignas(64) std::atomic<uint32_t> ready_word;    // ++ on every commit (futex)
  std::atomic<uint32_t> ready_sleepers;
  alignas(64) std::atomic<uint32_t> free_word;     // ++ on every release/reclaim (futex)
  std::atomic<uint32_t> free_sleepers;
  alignas(64) std::atomic<uint32_t> version_word;  // ++ on every publish (futex)
  std::atomic<uint32_t> version_sleepers;
  alignas(64) std::atomic<uint32_t> ack_word;      // ++ on every ack/release (futex)
  std::atomic<uint32_t> ack_sleepers;
};

// Where everything lies in the segment: computed from (n, slots, grad_dtype) with overflow checks,
// by create() to lay it out and by attach() to check the header against; each Region keeps its
// own copy. Every buffer starts on a page (so 64-byte aligned for SIMD and streaming stores).
struct Layout {
  uint64_t n = 0, slots = 0;
  uint32_t grad_dtype = kGradF32;
  uint64_t param_offset[2] = {0, 0};
  uint64_t slot_meta_offset = 0, slot_data_offset = 0, slot_stride = 0, total_bytes = 0;
};

// The mapping, shared by the Region and every view of its memory handed out (the last one unmaps).
struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  Mapping(void* b, size_t s) : base(b), size(s) {}
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

// What a pusher keeps to wait for the server to process its gradient.
struct Ticket {
  uint64_t push_seq = 0;
  int slot = -1;
  uint32_t acks = 0;  // the slot's ack count when the gradient was committed
};

struct TimeoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The segment's directory has no room for the region (create() reserves all of it up front).
struct SpaceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Collected {
  int slot;
  int worker;
  uint64_t version, tokens, push_seq;
  double loss;
  float bound;
  uint64_t position;
};

struct Reclaimed {
  int slot, pid, worker;
};

class Region {
 public:
  static std::unique_ptr<Region> create(uint64_t n, uint64_t slots, uint32_t grad_dtype = kGradF32);
  static std::unique_ptr<Region> attach(const std::string& name);
  // Unlinks pyasgd-* segments of this user whose owner's lock is free (owner dead); returns how many.
  static int sweep_stale();
  ~Region();

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }  // the segment's file (PYASGD_SHM_DIR/name)
  uint64_t n() const { return lay_.n; }
  uint64_t slots() const { return lay_.slots; }
  uint32_t grad_dtype() const { return lay_.grad_dtype; }
  bool is_owner() const;  // the creating process only (not a fork of it)
  void* base() const { return map_->base; }
  size_t size() const { return map_->size; }
  std::shared_ptr<Mapping> mapping() const { return map_; }
  uint64_t param_offset(int i) const;
  uint64_t slot_offset(int k) const;

  uint64_t version() const { return h_->published.load(std::memory_order_acquire) >> 1; }
  uint64_t reclaimed() const { return h_->reclaimed.load(); }
  bool closed() const { return h_->closed.load() != 0; }
  void close();  // wakes every waiter; later waits raise ClosedError
  void unlink();

  // Parameters (one writer: the server)
  int front_index() const;           // the published buffer's index (the writer reads it in place)
  int begin_write();                 // the back buffer's index, now marked odd
  uint64_t end_write(bool publish);  // publish: version+1 now visible; else the buffer is invalid
  void read_begin(uint64_t* version, int* index, uint64_t* seq) const;
  bool read_validate(int index, uint64_t seq) const;
  uint64_t pull_cpu(float* dst) const;  // full seqlocked copy
  uint64_t wait_version(uint64_t above, double timeout);  // until version > above

  // Gradient ring
  int claim(int worker, double timeout);
  Ticket commit(int slot, uint64_t version, uint64_t tokens, double loss, float bound,
                uint64_t position = 0);
  void abandon(int slot);
  // Claim, copy src into the slot (rounded to bf16 in a bf16 region) measuring max |g|, commit.
  Ticket push_cpu(const float* src, int worker, uint64_t version, uint64_t tokens, double loss, uint64_t position,
                  double timeout);
  // Server: the gradients in `slots` are processed (in the accumulation, or in a published
  // update); release() acks too. Pushers wait for it with wait_ack (push, processed, pull).
  void ack(const std::vector<int>& slots);
  void wait_ack(const Ticket& t, double timeout);
  std::vector<Collected> collect(int G, double timeout, std::vector<Reclaimed>* reclaimed);
  void release(const std::vector<int>& slots);
  std::vector<Reclaimed> reclaim_dead();
  uint32_t slot_state(int k) const;

 private:
  uint64_t take_held(int slot, const char* what);
  Region() = default;
  void check_slot(int k, const char* what) const;
  SlotMeta& meta(int k) const;
  float* param_ptr(int i) const;
  char* slot_ptr(int k) const;

  std::string name_, path_;
  std::shared_ptr<Mapping> map_;
  Header* h_ = nullptr;
  Layout lay_;  // validated copy: never re-read from the shared header
  // Per slot, the ownership word this object's claim installed (0: none): commit and abandon
  // CAS from it, so they act only on the claim they made.
  std::unique_ptr<std::atomic<uint64_t>[]> held_;
  // The slot locks (region.cpp, "slot locks"): an open file description of the segment of this
  // process's own, on which it holds the byte-range lock of each slot it is writing.
  int slot_lock_fd();
  bool try_lock_slot(int k);
  void unlock_slot(int k);
  int base_fd_ = -1;          // the segment as mapped by create()/attach() (not the owner's flocked fd)
  int lock_fd_ = -1;          // the slot locks' own description (opened on first use, per process)
  int lock_entry_slots_ = -1;  // where lock_fd_ is registered (a forked child closes its copy)
  int lock_pid_ = 0;          // the process lock_fd_ belongs to
  int creator_pid_ = 0;  // owner only
  int lock_entry_ = -1;  // owner only: where the locked fd is registered (region.cpp)
  bool unlinked_ = false;
};

}  // namespace pyasgd
