// Process-wide thread pool for the CPU kernels (see thread_pool.h).
#include "cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <cstdlib>
#include <memory>
#include <new>

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
// The pool slot and the requested size, under pool_mu. Held only for pointer updates (a pool is
// built under it, never destroyed under it), so fork's prepare handler can take it briefly.
std::mutex pool_mu;
std::shared_ptr<ThreadPool> the_pool;
int requested_threads = 0;  // 0: default

// fork() from one thread while others use the pool: prepare takes pool_mu so the child gets a
// consistent slot (not one half-way through set_threads). In the child only the forking thread
// exists: the mutex it holds is replaced by a fresh one, and the parent's pool is abandoned, not
// destroyed, because its destructor would join threads that do not exist and its own mutexes may
// be held by them (a run() in progress on another thread). The child builds a new pool on first
// use. The abandoned pool is a small leak per fork, never touched again.
void before_fork() { pool_mu.lock(); }
void after_fork_in_parent() { pool_mu.unlock(); }
void after_fork_in_child() {
  new (&pool_mu) std::mutex();
  new std::shared_ptr<ThreadPool>(std::move(the_pool));  // leaked on purpose, see above
}
[[maybe_unused]] const int g_atfork = pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
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

PoolRef pool() {
  std::lock_guard<std::mutex> lk(pool_mu);
  if (!the_pool) the_pool = std::make_shared<ThreadPool>(requested_threads > 0 ? requested_threads : default_threads());
  return PoolRef(the_pool);
}

void set_threads(int n) {
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lk(pool_mu);
    requested_threads = n;
    old = std::move(the_pool);  // recreated with the new size on next use
  }
  // `old` is destroyed here, outside the lock, unless a run() still holds it: then by that call.
}

}  // namespace pyasgd::cpu
