#include "attention.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "vec_math.h"

namespace pf_engine {

namespace {

// One (sequence, kv head): the group of query heads that share it, in three passes
// over the sequence's tokens: scores, their exponentials, the weighted sum of values.
// Loops run over head_dim or over tokens with no dependence between lanes, so the
// compiler vectorizes them.
// Dot product in 8 independent partial sums: one running sum is a chain the compiler may not
// reorder, so it would stay scalar.
inline float dot(const float* x, const float* y, int64_t n) {
  float partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) partial[k] += x[i + k] * y[i + k];
  }
  for (; i < n; ++i) partial[0] += x[i] * y[i];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// Built for AVX-512, AVX2 and the baseline; the loader picks what the CPU has.
__attribute__((target_clones("avx512f", "avx2", "default")))
void attend(const DecodeAttention& a, int64_t seq, int64_t kv_head, std::vector<float>& scores) {
  const int64_t group = a.num_q_heads / a.num_kv_heads, d = a.head_dim, len = a.seq_lens[seq];
  const int64_t token_stride = a.num_kv_heads * d, half = a.block_size * token_stride;
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  const float* q = a.q + (seq * a.num_q_heads + kv_head * group) * d;
  float* out = a.out + (seq * a.num_q_heads + kv_head * group) * d;
  scores.resize(group * len);
  for (int64_t t = 0; t < len; ++t) {
    const float* k = a.kv + table[t / a.block_size] * 2 * half + (t % a.block_size) * token_stride + kv_head * d;
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(q + g * d, k, d) * a.scale;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * len;
    const float top = *std::max_element(s, s + len);
    float total = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = vexp(s[t] - top);
      total += s[t];
    }
    const float norm = 1.0f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= norm;
    std::fill(out + g * d, out + (g + 1) * d, 0.0f);
  }
  for (int64_t t = 0; t < len; ++t) {
    const float* v = a.kv + table[t / a.block_size] * 2 * half + half + (t % a.block_size) * token_stride + kv_head * d;
    for (int64_t g = 0; g < group; ++g) {
      const float w = scores[g * len + t];
      float* o = out + g * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * v[i];
    }
  }
}

}  // namespace

void paged_decode_attention(const DecodeAttention& a, int num_threads) {
  const int64_t items = a.num_seqs * a.num_kv_heads;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, items));
  // Items go to threads in contiguous runs: a problem's particles sit side by side and
  // share their prompt's blocks, which then stay in this core's cache.
  auto run = [&](int64_t w) {
    std::vector<float> scores;
    for (int64_t item = items * w / workers; item < items * (w + 1) / workers; ++item) {
      attend(a, item / a.num_kv_heads, item % a.num_kv_heads, scores);
    }
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
}

}  // namespace pf_engine
