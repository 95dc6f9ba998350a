// Paged KV-cache bookkeeping shared by all particles: a fixed pool of blocks,
// reference counts, and one block table per sequence. Knows nothing of torch
// or Python; the pybind11 layer in bindings.cpp only converts arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace pf_engine {

// Not enough free blocks; raised before anything is changed.
class OutOfBlocks : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An id that was never handed out, or was freed.
class UnknownSequence : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A read-only view of a caller's contiguous array (C++17 has no std::span).
template <typename T>
struct View {
  const T* data = nullptr;
  std::size_t size = 0;
  const T& operator[](std::size_t i) const { return data[i]; }
};

struct AppendResult {
  std::vector<int32_t> slot_mapping;  // [sum(num_new_tokens)] slot of each new token
  std::vector<int32_t> copies;        // [num_copies * 2] (src, dst) block pairs
};

// The CSR page table flashinfer's paged-KV wrappers take.
struct PageTable {
  std::vector<int32_t> indptr;         // [num_seqs + 1]
  std::vector<int32_t> indices;        // [indptr[num_seqs]] block ids
  std::vector<int32_t> last_page_len;  // [num_seqs] tokens in each last block
};

// Not thread-safe: one engine loop owns a manager.
class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  int32_t num_free_blocks() const { return static_cast<int32_t>(free_blocks_.size()); }
  std::size_t num_seqs() const { return seqs_.size(); }

  bool can_allocate(int64_t num_tokens) const;
  int64_t allocate(int64_t num_tokens);
  void free(int64_t seq_id);
  int64_t fork(int64_t seq_id);

  // Blocks that append(seq_ids, num_new_tokens) would take from the pool,
  // copy-on-write copies included.
  int64_t num_blocks_to_append(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const;
  bool can_append(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const;
  AppendResult append(View<int64_t> seq_ids, View<int64_t> num_new_tokens);
  // Shortens sequence seq_ids[i] to its first num_tokens[i] tokens (at most its
  // length), giving back the blocks it no longer needs: the undo of an append
  // whose tokens were never written. A copy-on-write copy append made stays.
  void truncate(View<int64_t> seq_ids, View<int64_t> num_tokens);

  std::vector<int64_t> resample(View<int64_t> seq_ids, View<int64_t> ancestors);

  PageTable page_table(View<int64_t> seq_ids) const;
  std::vector<int32_t> slot_mapping(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const;

  const std::vector<int32_t>& block_table(int64_t seq_id) const { return get(seq_id).block_table; }
  int64_t num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }
  const std::vector<int32_t>& ref_counts() const { return ref_counts_; }
  std::vector<int64_t> seq_ids() const;
  // Blocks the sequences would hold if none shared any: the sum of their own block counts.
  int64_t num_unshared_blocks(View<int64_t> seq_ids) const;

 private:
  struct Sequence {
    std::vector<int32_t> block_table;
    int64_t num_tokens = 0;
    mutable uint64_t seen_in = 0;  // last batch call that named it (duplicate check)
  };
  using SeqPtrs = std::vector<const Sequence*>;

  const Sequence& get(int64_t seq_id) const;
  Sequence& get(int64_t seq_id);
  int64_t blocks_for(int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  // The sequences of a batch call, in order; raises for unknown or repeated ids.
  SeqPtrs lookup_unique(View<int64_t> seq_ids, const char* what) const;
  SeqPtrs check_batch(View<int64_t> seq_ids, View<int64_t> num_new_tokens, const char* what) const;
  int64_t num_blocks_to_append(const SeqPtrs& seqs, View<int64_t> num_new_tokens) const;
  void require_free(int64_t needed, const char* what) const;
  int32_t take_block();
  void release(const std::vector<int32_t>& block_table);

  int32_t num_blocks_;
  int32_t block_size_;
  std::vector<int32_t> ref_counts_;   // [num_blocks]
  std::vector<int32_t> free_blocks_;  // stack: the most recently freed block is reused first
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t next_seq_id_ = 0;           // ids are never reused, so a freed id stays unknown
  mutable uint64_t batch_calls_ = 0;  // numbers batch calls for Sequence::seen_in
};

}  // namespace pf_engine
