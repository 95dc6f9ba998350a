#include "sampling.h"

#include <algorithm>

#include "parallel.h"

namespace pf_engine {

namespace {

// Rows drawn together: each row's running sum is one chain of dependent additions (its order
// is the contract), so a lone row waits on every addition; eight chains side by side keep the
// adder busy.
constexpr int64_t kRows = 8;

// Rows [first, first + n), n <= kRows.
void draw(const float* probs, const float* uniforms, int64_t first, int64_t n, int64_t vocab, int64_t* out) {
  const float* row[kRows];
  double total[kRows] = {}, point[kRows], running[kRows] = {};
  int64_t found[kRows];
  for (int64_t k = 0; k < kRows; ++k) row[k] = probs + (first + std::min(k, n - 1)) * vocab;
  for (int64_t i = 0; i < vocab; ++i) {
    for (int64_t k = 0; k < kRows; ++k) total[k] += row[k][i];
  }
  for (int64_t k = 0; k < kRows; ++k) {
    point[k] = static_cast<double>(uniforms[first + std::min(k, n - 1)]) * total[k];
    found[k] = vocab - 1;  // no entry above the point (u * total rounded up to total): the last token
  }
  bool searching[kRows];
  std::fill(searching, searching + kRows, true);
  constexpr int64_t kStride = 64;  // entries between checks whether any row still searches
  for (int64_t start = 0; start < vocab && std::any_of(searching, searching + kRows, [](bool s) { return s; });
       start += kStride) {
    const int64_t stop = std::min(vocab, start + kStride);
    for (int64_t i = start; i < stop; ++i) {
      for (int64_t k = 0; k < kRows; ++k) {
        running[k] += row[k][i];
        const bool above = running[k] > point[k];
        found[k] = searching[k] && above ? i : found[k];
        searching[k] = searching[k] && !above;
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) out[first + k] = found[k];
}

}  // namespace

void inverse_cdf_sample(const float* probs, const float* uniforms, int64_t num_rows, int64_t vocab, int64_t* out,
                        int num_threads) {
  const int64_t groups = (num_rows + kRows - 1) / kRows;
  run_workers(num_threads, groups, [&](int64_t w, int64_t workers) {
    for (int64_t g = groups * w / workers; g < groups * (w + 1) / workers; ++g) {
      draw(probs, uniforms, g * kRows, std::min(kRows, num_rows - g * kRows), vocab, out);
    }
  });
}

}  // namespace pf_engine
