// ParallelFor: runs tasks 0..num_tasks-1 on the calling thread and on helpers from XLA's own
// thread pool, and returns when all are done. Helpers that start late find no task left and touch
// nothing but the shared counters. Each thread that takes tasks makes one `State` (scratch
// buffers, say) and passes it to every task it runs.

#ifndef FOLOJAX_PARALLEL_FOR_H_
#define FOLOJAX_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace folojax {

template <typename State, typename Task>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_tasks, const Task& task) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto drain = [counters, num_tasks, &task] {
    State state;
    for (int64_t i; (i = counters->next.fetch_add(1)) < num_tasks;) {
      task(i, state);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([counters, num_tasks, drain]() mutable {
      if (counters->next.load() < num_tasks) drain();
    });
  }
  drain();
  while (counters->done.load(std::memory_order_acquire) < num_tasks) std::this_thread::yield();
}

}  // namespace folojax

#endif  // FOLOJAX_PARALLEL_FOR_H_
