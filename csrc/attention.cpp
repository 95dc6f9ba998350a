#include "attention.h"

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vec_math.h"

namespace pf_engine {

namespace {

constexpr int64_t kChunk = 16;  // tokens scored together: one AVX-512 register of scores
constexpr int kMaxVectors = 8;  // head_dim up to 128 on the AVX-512 pass

// ---------------------------------------------------------------------------------------------
// Portable pass: one (sequence, kv head) in three sweeps over the tokens (scores, their
// exponentials, the weighted sum of values). Used where AVX-512 or its head_dim is missing.

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

__attribute__((target_clones("avx2", "default")))
void attend_portable(const DecodeAttention& a, int64_t seq, int64_t kv_head, std::vector<float>& scores) {
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

void attend_portable(const DecodeAttention& a, int64_t seq, std::vector<float>& scores) {
  for (int64_t h = 0; h < a.num_kv_heads; ++h) attend_portable(a, seq, h, scores);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 pass: one sequence, all heads, in a single sweep over chunks of 16 tokens with an
// online softmax (running max m, running sum l, unnormalized output acc per query head):
//
//   chunk c:  s = q k_c^T * scale          16 scores, one register
//             m' = max(m, max s);  p = exp(s - m');  l = l e^(m - m') + sum p
//             acc = acc e^(m - m') + p v_c
//   end:      out = acc / l
//
// A chunk's 16 keys (and values) are read while they are in L1 once per query head of their
// group; a sequence's blocks are read in order, so the hardware prefetcher sees runs.

// Sixteen dot-product registers -> one register of their sums, by a tree of lane shuffles
// (45 operations, where 16 separate horizontal sums would take about 130). The tree leaves
// sum t in lane 4 (t % 4) + t / 4; the last permutation puts it in lane t.
__attribute__((target("avx512f"))) inline __m512 sum16(const __m512* v) {
  __m512 half[8], quarter[4], eighth[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit lanes 0+2, 1+3: registers 2i, 2i+1 in the low, high halves
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                            _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // one register per 128-bit lane, four partial sums each
    quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0x88),
                               _mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // two partial sums each
    eighth[i] = _mm512_add_ps(_mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], 0x44),
                              _mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], 0xEE));
  }
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighth[0], eighth[1], 0x88),
                                    _mm512_shuffle_ps(eighth[0], eighth[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// Scratch of one thread: per query head a running max, a running sum and head_dim outputs.
struct OnlineState {
  std::vector<float> max, sum, acc;
};

template <int V>  // head_dim / 16
__attribute__((target("avx512f"))) void attend_avx512(const DecodeAttention& a, int64_t seq, OnlineState& st) {
  constexpr int64_t d = 16 * V;
  const int64_t group = a.num_q_heads / a.num_kv_heads, len = a.seq_lens[seq];
  const int64_t token_stride = a.num_kv_heads * d, half = a.block_size * token_stride;
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  const float* q_seq = a.q + seq * a.num_q_heads * d;
  st.max.assign(a.num_q_heads, -std::numeric_limits<float>::infinity());
  st.sum.assign(a.num_q_heads, 0.0f);
  st.acc.assign(a.num_q_heads * d, 0.0f);
  const float* keys[kChunk];
  alignas(64) float s[kChunk], p[kChunk];
  for (int64_t c = 0; c < len; c += kChunk) {
    const int64_t n = std::min(kChunk, len - c);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = c + t;
      keys[t] = a.kv + table[pos / a.block_size] * 2 * half + (pos % a.block_size) * token_stride;
    }
    for (int64_t head = 0; head < a.num_q_heads; ++head) {
      const int64_t kv_off = (head / group) * d;
      __m512 q[V], dots[kChunk];
      for (int j = 0; j < V; ++j) q[j] = _mm512_loadu_ps(q_seq + head * d + 16 * j);
      for (int64_t t = 0; t < kChunk; ++t) {
        __m512 acc = _mm512_setzero_ps();
        if (t < n) {
          for (int j = 0; j < V; ++j) acc = _mm512_fmadd_ps(q[j], _mm512_loadu_ps(keys[t] + kv_off + 16 * j), acc);
        }
        dots[t] = acc;
      }
      _mm512_store_ps(s, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(a.scale)));
      float top = st.max[head];
      for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
      const float rescale = vexp(st.max[head] - top);  // 0 on the first chunk (max was -inf)
      float total = 0.0f;
      for (int64_t t = 0; t < kChunk; ++t) {
        p[t] = t < n ? vexp(s[t] - top) : 0.0f;
        total += p[t];
      }
      st.max[head] = top;
      st.sum[head] = st.sum[head] * rescale + total;
      float* out = st.acc.data() + head * d;
      __m512 o[V];
      for (int j = 0; j < V; ++j) o[j] = _mm512_mul_ps(_mm512_loadu_ps(out + 16 * j), _mm512_set1_ps(rescale));
      for (int64_t t = 0; t < n; ++t) {
        const __m512 w = _mm512_set1_ps(p[t]);
        const float* v = keys[t] + half + kv_off;
        for (int j = 0; j < V; ++j) o[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * j), o[j]);
      }
      for (int j = 0; j < V; ++j) _mm512_storeu_ps(out + 16 * j, o[j]);
    }
  }
  float* out = a.out + seq * a.num_q_heads * d;
  for (int64_t head = 0; head < a.num_q_heads; ++head) {
    const float norm = 1.0f / st.sum[head];
    for (int64_t i = 0; i < d; ++i) out[head * d + i] = st.acc[head * d + i] * norm;
  }
}

using Pass = void (*)(const DecodeAttention&, int64_t, OnlineState&);

// The AVX-512 pass for this head_dim, or null where the portable pass runs.
Pass avx512_pass(int64_t head_dim) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  if (!has_avx512 || head_dim % 16 != 0 || head_dim / 16 > kMaxVectors) return nullptr;
  static constexpr Pass passes[kMaxVectors] = {attend_avx512<1>, attend_avx512<2>, attend_avx512<3>, attend_avx512<4>,
                                               attend_avx512<5>, attend_avx512<6>, attend_avx512<7>, attend_avx512<8>};
  return passes[head_dim / 16 - 1];
}

}  // namespace

const char* decode_attention_pass(int64_t head_dim) { return avx512_pass(head_dim) ? "avx512" : "portable"; }

void paged_decode_attention(const DecodeAttention& a, int num_threads) {
  const Pass fast = avx512_pass(a.head_dim);
  // Sequences go to threads in contiguous runs of about equal token counts: a problem's
  // particles sit side by side and share their prompt's blocks, which then stay in this
  // core's cache.
  std::vector<int64_t> ends(a.num_seqs + 1, 0);
  for (int64_t i = 0; i < a.num_seqs; ++i) ends[i + 1] = ends[i] + a.seq_lens[i];
  run_workers(num_threads, a.num_seqs, [&](int64_t w, int64_t workers) {
    const auto first = std::lower_bound(ends.begin(), ends.end(), ends.back() * w / workers) - ends.begin();
    const auto last = std::lower_bound(ends.begin(), ends.end(), ends.back() * (w + 1) / workers) - ends.begin();
    OnlineState st;
    std::vector<float> scores;
    for (int64_t seq = first; seq < last; ++seq) {
      if (fast) {
        fast(a, seq, st);
      } else {
        attend_portable(a, seq, scores);
      }
    }
  });
}

}  // namespace pf_engine
