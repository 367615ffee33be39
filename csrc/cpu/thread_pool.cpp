// Process-wide thread pool for the CPU kernels (see thread_pool.h).
#include "cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <cstdlib>
#include <memory>

namespace pyasgd::cpu {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::drain() {
  for (size_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) (*fn_)(i);
}

void ThreadPool::worker_loop() {
  unsigned long long seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    drain();
    std::lock_guard<std::mutex> lk(mu_);
    if (--busy_ == 0) done_.notify_one();
  }
}

void ThreadPool::run(size_t n_tasks, const std::function<void(size_t)>& fn) {
  if (n_tasks == 0) return;
  if (n_tasks == 1 || workers_.empty()) {
    for (size_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  std::lock_guard<std::mutex> run_lk(run_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    busy_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain();
  std::unique_lock<std::mutex> lk(mu_);
  done_.wait(lk, [&] { return busy_ == 0; });
}

namespace {
std::unique_ptr<ThreadPool>& pool_slot() {
  static std::unique_ptr<ThreadPool> p;
  return p;
}
int requested_threads = 0;  // 0: default
std::mutex pool_mu;

void after_fork_in_child() {
  // The parent's threads do not exist in the child: forget the pool without joining them.
  (void)pool_slot().release();
}
}  // namespace

int default_threads() {
  if (const char* env = std::getenv("PYASGD_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

ThreadPool& pool() {
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
  std::lock_guard<std::mutex> lk(pool_mu);
  auto& p = pool_slot();
  if (!p) p = std::make_unique<ThreadPool>(requested_threads > 0 ? requested_threads : default_threads());
  return *p;
}

void set_threads(int n) {
  std::lock_guard<std::mutex> lk(pool_mu);
  requested_threads = n;
  pool_slot().reset();  // recreated with the new size on next use
}

}  // namespace pyasgd::cpu
