// Decode attention over a paged KV cache on the CPU: one new query token per
// sequence attends to every token of its sequence, reading each key and value
// where it lies in the cache (no gathered copy). Float32; knows nothing of torch.
#pragma once

#include <cstdint>

namespace pf_engine {

struct DecodeAttention {
  const float* q;               // [num_seqs, num_q_heads, head_dim]
  const float* kv;              // [num_blocks, 2, block_size, num_kv_heads, head_dim]: K at 0, V at 1
  const int32_t* block_tables;  // [num_seqs, max_blocks]
  const int32_t* seq_lens;      // [num_seqs], each >= 1
  float* out;                   // [num_seqs, num_q_heads, head_dim]
  int64_t num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
};

// out = softmax(q k^T * scale) v per sequence and query head (query head h reads
// kv head h / (num_q_heads / num_kv_heads)).
// Sequences are split over num_threads threads in runs of about equal token counts.
void paged_decode_attention(const DecodeAttention& a, int num_threads);

// Which pass runs for head_dim on this CPU: "avx512" (one sweep, online softmax; head_dim a
// multiple of 16 up to 128) or "portable".
const char* decode_attention_pass(int64_t head_dim);

}  // namespace pf_engine
