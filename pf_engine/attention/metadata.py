"""The per-batch description of where every token's keys and values live."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per forward by the runner and passed explicitly to every layer.

    A batch holds ``num_seqs`` sequences; sequence ``i`` brings
    ``query_start[i + 1] - query_start[i]`` new tokens (a prefill chunk, or one
    token when decoding) and has ``seq_lens[i]`` tokens in all, the new ones
    last. Its blocks are row ``i`` of ``block_tables`` (padded with block 0)::

        seq 0: 5 tokens, 2 new     query_start [0, 2, 3]
        seq 1: 9 tokens, 1 new     seq_lens    [5, 9]
        block_size 4               block_tables [[7, 2, 0], [1, 4, 6]]
    """

    query_start: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    positions: torch.Tensor  # int64 [num_tokens] position of each new token in its sequence
    slot_mapping: torch.Tensor  # int64 [num_tokens] cache slot of each new token
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    page_indptr: torch.Tensor  # int32 [num_seqs + 1]  (flashinfer's CSR page table)
    page_indices: torch.Tensor  # int32 [page_indptr[-1]]
    last_page_len: torch.Tensor  # int32 [num_seqs]
    block_size: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.max_query_len == 1 and self.positions.shape[0] == self.num_seqs


def build_metadata(manager, seq_ids, num_new_tokens, slot_mapping, device) -> AttentionMetadata:
    """Metadata for ``seq_ids`` after ``manager.append(seq_ids, num_new_tokens)`` returned ``slot_mapping``."""
    num_new = np.asarray(num_new_tokens, dtype=np.int64)
    indptr, indices, last_page_len = manager.page_table(seq_ids)
    pages = np.diff(indptr)
    seq_lens = np.where(pages > 0, (pages - 1) * manager.block_size + last_page_len, 0)
    query_start = np.concatenate([[0], np.cumsum(num_new)])
    # positions: the last num_new[i] positions of sequence i, without a Python loop per sequence
    owner = np.repeat(np.arange(len(num_new)), num_new)
    positions = np.arange(query_start[-1]) - query_start[owner] + (seq_lens - num_new)[owner]
    width = int(pages.max(initial=0))
    block_tables = np.zeros((len(pages), max(width, 1)), dtype=np.int32)
    block_tables[np.arange(width)[None, :] < pages[:, None]] = indices

    def dev(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return AttentionMetadata(
        query_start=dev(query_start, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        positions=dev(positions, torch.int64),
        slot_mapping=dev(slot_mapping, torch.int64),
        block_tables=dev(block_tables, torch.int32),
        page_indptr=dev(indptr, torch.int32),
        page_indices=dev(indices, torch.int32),
        last_page_len=dev(last_page_len, torch.int32),
        block_size=manager.block_size,
        max_query_len=int(num_new.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
    )
