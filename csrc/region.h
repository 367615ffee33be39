// The shared region: one POSIX shared-memory segment per run holding a header of atomics, the
// published parameters (two buffers, each behind its own seqlock) and a ring of K gradient slots.
//
// Parameters: the server writes the buffer that is not published (begin_write/end_write) and
// then flips the published word (version << 1 | buffer). A reader copies the published buffer
// and validates that buffer's sequence number afterwards: an odd or changed number means the
// server started overwriting it (the reader fell a whole update behind) and the copy is retried.
// Readers never block the server, and a pull never returns a mix of two versions.
//
// Gradient slots: FREE -> WRITING by compare-and-swap (any pusher), WRITING -> READY after the
// copy (the pusher), READY -> READING by the single consumer (the server), READING -> FREE on
// release. A WRITING slot whose owner process is dead is reclaimed (-> FREE) by whoever waits.
// Waiting spins briefly, then sleeps on a futex; wakers only make the syscall when someone sleeps.
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
constexpr uint32_t kLayoutVersion = 3;

enum SlotState : uint32_t { kFree = 0, kWriting = 1, kReady = 2, kReading = 3 };

struct alignas(64) SlotMeta {
  std::atomic<uint32_t> state;
  int32_t owner_pid;  // pid of the pusher holding it (WRITING/READY)
  int32_t worker;
  uint32_t pad_;
  uint64_t version;   // parameter version the gradient was computed from
  uint64_t tokens;
  uint64_t push_seq;  // arrival order, unique per region
  double loss;
  float bound;  // max |g| measured while copying in (+inf: not finite; < 0: unknown)
  std::atomic<uint32_t> acks;  // ++ when the server has processed what the slot held
};

struct alignas(64) Header {
  uint64_t magic;
  uint32_t layout_version;
  int32_t owner_pid;
  uint64_t n;         // parameters (fp32 elements)
  uint64_t slots;     // K
  uint64_t param_offset[2];
  uint64_t slot_meta_offset;
  uint64_t slot_data_offset;
  uint64_t slot_stride;  // bytes between slot buffers
  uint64_t total_bytes;
  alignas(64) std::atomic<uint64_t> published;  // version << 1 | buffer index
  alignas(64) std::atomic<uint64_t> buf_seq[2];  // seqlocks: odd while being written
  std::atomic<uint64_t> buf_version[2];          // version each buffer holds
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

// What a pusher keeps to wait for the server to process its gradient.
struct Ticket {
  uint64_t push_seq;
  int slot;
  uint32_t acks;  // the slot's ack count when the gradient was committed
};

struct TimeoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Collected {
  int slot;
  int worker;
  uint64_t version, tokens, push_seq;
  double loss;
  float bound;
};

struct Reclaimed {
  int slot, pid, worker;
};

class Region {
 public:
  static std::unique_ptr<Region> create(uint64_t n, uint64_t slots);
  static std::unique_ptr<Region> attach(const std::string& name);
  static int sweep_stale();  // unlinks pyasgd-* segments whose owner is dead; returns how many
  ~Region();

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }  // the segment's file (PYASGD_SHM_DIR/name)
  uint64_t n() const { return h_->n; }
  uint64_t slots() const { return h_->slots; }
  bool is_owner() const { return owner_; }
  void* base() const { return base_; }
  size_t size() const { return size_; }
  uint64_t param_offset(int i) const { return h_->param_offset[i]; }
  uint64_t slot_offset(int k) const { return h_->slot_data_offset + k * h_->slot_stride; }

  uint64_t version() const { return h_->published.load(std::memory_order_acquire) >> 1; }
  uint64_t reclaimed() const { return h_->reclaimed.load(); }
  bool closed() const { return h_->closed.load() != 0; }
  void close();  // wakes every waiter; later waits raise ClosedError
  void unlink();

  // Parameters
  int begin_write();               // the back buffer's index, now marked odd
  uint64_t end_write(bool publish);  // publish: version+1 now visible; returns published version
  void read_begin(uint64_t* version, int* index, uint64_t* seq) const;
  bool read_validate(int index, uint64_t seq) const;
  uint64_t pull_cpu(float* dst) const;  // full seqlocked copy
  uint64_t wait_version(uint64_t above, double timeout);  // until version > above

  // Gradient ring
  int claim(int worker, double timeout);
  Ticket commit(int slot, uint64_t version, uint64_t tokens, double loss, float bound);
  void abandon(int slot);
  Ticket push_cpu(const float* src, int worker, uint64_t version, uint64_t tokens, double loss,
                  double timeout);
  // Server: the gradients in `slots` are processed (in the accumulation, or in a published
  // update); release() acks too. Pushers wait for it with wait_ack (push, processed, pull).
  void ack(const std::vector<int>& slots);
  void wait_ack(const Ticket& t, double timeout);
  std::vector<Collected> collect(int G, double timeout, std::vector<Reclaimed>* reclaimed);
  void release(const std::vector<int>& slots);
  std::vector<Reclaimed> reclaim_dead();
  uint32_t slot_state(int k) const { return meta(k).state.load(); }

 private:
  Region() = default;
  SlotMeta& meta(int k) const;
  float* param_ptr(int i) const;
  float* slot_ptr(int k) const;

  std::string name_, path_;
  void* base_ = nullptr;
  size_t size_ = 0;
  Header* h_ = nullptr;
  bool owner_ = false;
  bool unlinked_ = false;
};

}  // namespace pyasgd
