// A small persistent thread pool for the CPU kernels: idle threads sleep on a condition variable
// (no spinning), the caller works too, and tasks are claimed from an atomic counter.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
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

// The process-wide pool (created on first use; recreated after fork in the child).
ThreadPool& pool();
int default_threads();
void set_threads(int n);

}  // namespace pyasgd::cpu
