// A small persistent thread pool for the CPU kernels: idle threads sleep on a condition variable
// (no spinning), the caller works too, and tasks are claimed from an atomic counter.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace pyasgd::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Runs fn(0..n_tasks-1), each exactly once, across the pool and the caller; returns when done.
  void run(size_t n_tasks, const std::function<void(size_t)>& fn);

 private:
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one run() at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_tasks_ = 0;
  std::atomic<size_t> next_{0};
  int busy_ = 0;
  unsigned long long generation_ = 0;
  bool stop_ = false;
};

// A share of the process-wide pool: the pool lives at least as long as the handle. Callers write
// `pool().run(...)`; the temporary handle lasts until run() returns, so set_threads() on another
// thread can replace the pool meanwhile without destroying the one still running the call (the
// last handle destroys it, joining its idle threads).
class PoolRef {
 public:
  explicit PoolRef(std::shared_ptr<ThreadPool> p) : p_(std::move(p)) {}
  int size() const { return p_->size(); }
  void run(size_t n_tasks, const std::function<void(size_t)>& fn) const { p_->run(n_tasks, fn); }

 private:
  std::shared_ptr<ThreadPool> p_;
};

// The process-wide pool (created on first use with set_threads()'s count or the default; a
// forked child starts a fresh one on first use, since the parent's threads do not exist in it).
PoolRef pool();
int default_threads();
void set_threads(int n);  // takes effect for calls that start after it

}  // namespace pyasgd::cpu
