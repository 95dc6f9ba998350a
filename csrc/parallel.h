// Work split over a few threads for the native CPU passes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace pf_engine {

// The OpenMP runtime torch's CPU ops run on, where Python handed over its entry points
// (set_openmp in bindings.cpp; pf_engine/_native.py finds them). After each of its parallel
// regions that runtime's threads spin a while waiting for more work, so threads of our own
// would share the cores with those spinners (measured: a decode attention pass run right
// after a linear layer took twice as long). Run on the same threads, a pass starts at once.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                          // omp_get_thread_num
  int (*num_threads)() = nullptr;                                         // omp_get_num_threads
};
inline OpenMP openmp;

// run(w, workers) for w in [0, workers), all finished before this returns; workers is at most
// min(num_threads, num_items) and at least 1. On the OpenMP runtime above where it is set (the
// team it grants may be smaller than asked), else worker 0 on the calling thread and the
// others on threads of their own.
template <class Run>
void run_workers(int num_threads, int64_t num_items, Run&& run) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items));
  if (workers > 1 && openmp.parallel != nullptr) {
    using Job = std::remove_reference_t<Run>;
    openmp.parallel([](void* job) { (*static_cast<Job*>(job))(openmp.thread_num(), openmp.num_threads()); },
                    const_cast<void*>(static_cast<const void*>(&run)), static_cast<unsigned>(workers), 0);
    return;
  }
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, w, workers);
  run(0, workers);
  for (auto& t : threads) t.join();
}

}  // namespace pf_engine
