#include "block_manager.h"

#include <algorithm>

namespace pf_engine {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0) {
    throw std::invalid_argument("num_blocks must be positive, got " + std::to_string(num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
  }
  // Slot indices are int32 (flashinfer's and the kernels' index type).
  if (static_cast<int64_t>(num_blocks) * block_size > INT32_MAX) {
    throw std::invalid_argument("num_blocks * block_size must fit in int32, got " +
                                std::to_string(static_cast<int64_t>(num_blocks) * block_size));
  }
  ref_counts_.assign(num_blocks, 0);
  free_blocks_.resize(num_blocks);
  for (int32_t i = 0; i < num_blocks; ++i) free_blocks_[i] = num_blocks - 1 - i;  // block 0 on top
}

const BlockManager::Sequence& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequence("unknown or freed sequence id " + std::to_string(seq_id));
  return it->second;
}

BlockManager::Sequence& BlockManager::get(int64_t seq_id) {
  return const_cast<Sequence&>(static_cast<const BlockManager*>(this)->get(seq_id));
}

void BlockManager::require_free(int64_t needed, const char* what) const {
  if (needed > num_free_blocks()) {
    throw OutOfBlocks(std::string(what) + " needs " + std::to_string(needed) + " blocks but only " +
                      std::to_string(num_free_blocks()) + " of " + std::to_string(num_blocks_) +
                      " are free (block_size " + std::to_string(block_size_) + ")");
  }
}

int32_t BlockManager::take_block() {
  int32_t block = free_blocks_.back();
  free_blocks_.pop_back();
  ref_counts_[block] = 1;
  return block;
}

void BlockManager::release(const std::vector<int32_t>& block_table) {
  for (int32_t block : block_table) {
    if (--ref_counts_[block] == 0) free_blocks_.push_back(block);
  }
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) throw std::invalid_argument("num_tokens must be >= 0, got " + std::to_string(num_tokens));
  return blocks_for(num_tokens) <= num_free_blocks();
}

int64_t BlockManager::allocate(int64_t num_tokens) {
  if (!can_allocate(num_tokens)) require_free(blocks_for(num_tokens), "allocate");  // throws
  Sequence seq;
  seq.block_table.reserve(blocks_for(num_tokens));
  for (int64_t i = 0; i < blocks_for(num_tokens); ++i) seq.block_table.push_back(take_block());
  seq.num_tokens = num_tokens;
  int64_t seq_id = next_seq_id_++;
  seqs_.emplace(seq_id, std::move(seq));
  return seq_id;
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequence("unknown or freed sequence id " + std::to_string(seq_id));
  release(it->second.block_table);
  seqs_.erase(it);
}

int64_t BlockManager::fork(int64_t seq_id) {
  Sequence child = get(seq_id);  // copies the table: every block is shared
  for (int32_t block : child.block_table) ++ref_counts_[block];
  int64_t child_id = next_seq_id_++;
  seqs_.emplace(child_id, std::move(child));
  return child_id;
}

BlockManager::SeqPtrs BlockManager::lookup_unique(View<int64_t> seq_ids, const char* what) const {
  const uint64_t call = ++batch_calls_;
  SeqPtrs seqs(seq_ids.size);
  for (std::size_t i = 0; i < seq_ids.size; ++i) {
    const Sequence& seq = get(seq_ids[i]);
    if (seq.seen_in == call) {
      throw std::invalid_argument(std::string(what) + ": sequence id " + std::to_string(seq_ids[i]) +
                                  " appears more than once");
    }
    seq.seen_in = call;
    seqs[i] = &seq;
  }
  return seqs;
}

BlockManager::SeqPtrs BlockManager::check_batch(View<int64_t> seq_ids, View<int64_t> num_new_tokens,
                                                const char* what) const {
  if (seq_ids.size != num_new_tokens.size) {
    throw std::invalid_argument(std::string(what) + ": seq_ids has " + std::to_string(seq_ids.size) +
                                " entries but num_new_tokens has " + std::to_string(num_new_tokens.size));
  }
  for (std::size_t i = 0; i < num_new_tokens.size; ++i) {
    if (num_new_tokens[i] < 0) {
      throw std::invalid_argument(std::string(what) + ": num_new_tokens[" + std::to_string(i) + "] is " +
                                  std::to_string(num_new_tokens[i]) + ", must be >= 0");
    }
  }
  return lookup_unique(seq_ids, what);
}

int64_t BlockManager::num_blocks_to_append(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const {
  return num_blocks_to_append(check_batch(seq_ids, num_new_tokens, "append"), num_new_tokens);
}

int64_t BlockManager::num_blocks_to_append(const SeqPtrs& seqs, View<int64_t> num_new_tokens) const {
  // A shared last block is copied by the first sequence that writes to it; the
  // writers after it see one reference fewer, and the last one writes in place.
  std::unordered_map<int32_t, int32_t> copied_away;
  int64_t needed = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = *seqs[i];
    int64_t n = num_new_tokens[i];
    if (n == 0) continue;
    needed += blocks_for(seq.num_tokens + n) - blocks_for(seq.num_tokens);
    if (seq.num_tokens % block_size_ != 0) {
      int32_t last = seq.block_table.back();
      auto it = copied_away.find(last);
      int32_t refs = ref_counts_[last] - (it == copied_away.end() ? 0 : it->second);
      if (refs > 1) {
        ++needed;
        ++copied_away[last];
      }
    }
  }
  return needed;
}

bool BlockManager::can_append(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const {
  return num_blocks_to_append(seq_ids, num_new_tokens) <= num_free_blocks();
}

AppendResult BlockManager::append(View<int64_t> seq_ids, View<int64_t> num_new_tokens) {
  const SeqPtrs seqs = check_batch(seq_ids, num_new_tokens, "append");
  require_free(num_blocks_to_append(seqs, num_new_tokens), "append");
  AppendResult out;
  int64_t total = 0;
  for (std::size_t i = 0; i < num_new_tokens.size; ++i) total += num_new_tokens[i];
  out.slot_mapping.reserve(total);
  // Everything that can throw has run; from here on nothing fails.
  for (std::size_t i = 0; i < seq_ids.size; ++i) {
    Sequence& seq = const_cast<Sequence&>(*seqs[i]);
    int64_t n = num_new_tokens[i];
    if (n == 0) continue;
    std::vector<int32_t>& table = seq.block_table;
    if (seq.num_tokens % block_size_ != 0 && ref_counts_[table.back()] > 1) {
      int32_t shared = table.back();
      int32_t own = take_block();
      --ref_counts_[shared];
      table.back() = own;
      out.copies.push_back(shared);
      out.copies.push_back(own);
    }
    for (int64_t pos = seq.num_tokens; pos < seq.num_tokens + n; ++pos) {
      int64_t offset = pos % block_size_;
      if (offset == 0) table.push_back(take_block());
      out.slot_mapping.push_back(static_cast<int32_t>(table[pos / block_size_] * block_size_ + offset));
    }
    seq.num_tokens += n;
  }
  return out;
}

void BlockManager::truncate(View<int64_t> seq_ids, View<int64_t> num_tokens) {
  if (seq_ids.size != num_tokens.size) {
    throw std::invalid_argument("truncate: seq_ids has " + std::to_string(seq_ids.size) +
                                " entries but num_tokens has " + std::to_string(num_tokens.size));
  }
  const SeqPtrs seqs = lookup_unique(seq_ids, "truncate");
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    if (num_tokens[i] < 0 || num_tokens[i] > seqs[i]->num_tokens) {
      throw std::invalid_argument("truncate: sequence " + std::to_string(seq_ids[i]) + " has " +
                                  std::to_string(seqs[i]->num_tokens) + " tokens, cannot keep " +
                                  std::to_string(num_tokens[i]));
    }
  }
  // Everything that can throw has run; from here on nothing fails.
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    Sequence& seq = const_cast<Sequence&>(*seqs[i]);
    std::vector<int32_t>& table = seq.block_table;
    const auto keep = static_cast<std::size_t>(blocks_for(num_tokens[i]));
    release(std::vector<int32_t>(table.begin() + keep, table.end()));
    table.resize(keep);
    seq.num_tokens = num_tokens[i];
  }
}

std::vector<int64_t> BlockManager::resample(View<int64_t> seq_ids, View<int64_t> ancestors) {
  lookup_unique(seq_ids, "resample");
  for (std::size_t j = 0; j < ancestors.size; ++j) {
    if (ancestors[j] < 0 || ancestors[j] >= static_cast<int64_t>(seq_ids.size)) {
      throw std::invalid_argument("resample: ancestors[" + std::to_string(j) + "] is " +
                                  std::to_string(ancestors[j]) + ", must be in [0, " +
                                  std::to_string(seq_ids.size) + ")");
    }
  }
  // Forking takes no block, so nothing below can fail.
  std::vector<char> kept(seq_ids.size, 0);
  std::vector<int64_t> new_seq_ids(ancestors.size);
  for (std::size_t j = 0; j < ancestors.size; ++j) {
    int64_t a = ancestors[j];
    if (kept[a]) {
      new_seq_ids[j] = fork(seq_ids[a]);
    } else {
      kept[a] = 1;
      new_seq_ids[j] = seq_ids[a];
    }
  }
  for (std::size_t i = 0; i < seq_ids.size; ++i) {
    if (!kept[i]) free(seq_ids[i]);
  }
  return new_seq_ids;
}

PageTable BlockManager::page_table(View<int64_t> seq_ids) const {
  SeqPtrs seqs(seq_ids.size);
  std::size_t num_indices = 0;
  for (std::size_t i = 0; i < seq_ids.size; ++i) {
    seqs[i] = &get(seq_ids[i]);
    num_indices += seqs[i]->block_table.size();
  }
  PageTable out;
  out.indptr.resize(seq_ids.size + 1);
  out.indices.resize(num_indices);
  out.last_page_len.resize(seq_ids.size);
  int32_t* dst = out.indices.data();
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = *seqs[i];
    dst = std::copy(seq.block_table.begin(), seq.block_table.end(), dst);
    out.indptr[i + 1] = static_cast<int32_t>(dst - out.indices.data());
    out.last_page_len[i] = seq.num_tokens == 0 ? 0 : static_cast<int32_t>((seq.num_tokens - 1) % block_size_ + 1);
  }
  return out;
}

std::vector<int32_t> BlockManager::slot_mapping(View<int64_t> seq_ids, View<int64_t> num_new_tokens) const {
  const SeqPtrs seqs = check_batch(seq_ids, num_new_tokens, "slot_mapping");
  std::vector<int32_t> out;
  for (std::size_t i = 0; i < seq_ids.size; ++i) {
    const Sequence& seq = *seqs[i];
    if (num_new_tokens[i] > seq.num_tokens) {
      throw std::invalid_argument("slot_mapping: num_new_tokens[" + std::to_string(i) + "] is " +
                                  std::to_string(num_new_tokens[i]) + " but sequence " +
                                  std::to_string(seq_ids[i]) + " holds only " +
                                  std::to_string(seq.num_tokens) + " tokens");
    }
    for (int64_t pos = seq.num_tokens - num_new_tokens[i]; pos < seq.num_tokens; ++pos) {
      out.push_back(static_cast<int32_t>(seq.block_table[pos / block_size_] * block_size_ + pos % block_size_));
    }
  }
  return out;
}

int64_t BlockManager::num_unshared_blocks(View<int64_t> seq_ids) const {
  int64_t total = 0;
  for (std::size_t i = 0; i < seq_ids.size; ++i) total += blocks_for(get(seq_ids[i]).num_tokens);
  return total;
}

std::vector<int64_t> BlockManager::seq_ids() const {
  std::vector<int64_t> out;
  out.reserve(seqs_.size());
  for (const auto& kv : seqs_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace pf_engine
