// Work split over a few threads for the native CPU passes (two cores here; no pool needed).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace pf_engine {

// run(w) for w in [0, workers): worker 0 on the calling thread, the others on their own,
// all joined before this returns. workers = min(num_threads, num_items), at least 1.
template <class Run>
void run_workers(int num_threads, int64_t num_items, Run&& run) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items));
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, w, workers);
  run(0, workers);
  for (auto& t : threads) t.join();
}

}  // namespace pf_engine
