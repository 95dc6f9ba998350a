"""Plain-Python BlockManager with the native one's semantics, block for block.

It is the oracle of the property tests and the baseline of
bench/bench_block_manager.py (per-sequence Python bookkeeping, the way
Python search loops keep their particles). Same free-list order, same
copy-on-write choices, same errors; no speed.
"""

import numpy as np

from pf_engine.errors import OutOfBlocksError


class PyBlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # block 0 on top
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    # -- queries ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_seqs(self) -> int:
        return len(self._tables)

    def block_table(self, seq_id: int) -> np.ndarray:
        return np.array(self._table(seq_id), dtype=np.int32)

    def num_tokens(self, seq_id: int) -> int:
        self._table(seq_id)
        return self._lengths[seq_id]

    def ref_counts(self) -> np.ndarray:
        return np.array(self._refs, dtype=np.int32)

    def num_unshared_blocks(self, seq_ids) -> int:
        return sum(self._blocks_for(self.num_tokens(int(s))) for s in seq_ids)

    def seq_ids(self) -> np.ndarray:
        return np.array(sorted(self._tables), dtype=np.int64)

    def can_allocate(self, num_tokens: int) -> bool:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return self._blocks_for(num_tokens) <= len(self._free)

    def num_blocks_to_append(self, seq_ids, num_new_tokens) -> int:
        seq_ids, num_new_tokens = self._check_batch(seq_ids, num_new_tokens)
        copied_away: dict[int, int] = {}
        needed = 0
        for seq_id, n in zip(seq_ids, num_new_tokens, strict=True):
            if n == 0:
                continue
            length, table = self._lengths[seq_id], self._tables[seq_id]
            needed += self._blocks_for(length + n) - self._blocks_for(length)
            if length % self.block_size:
                last = table[-1]
                if self._refs[last] - copied_away.get(last, 0) > 1:
                    needed += 1
                    copied_away[last] = copied_away.get(last, 0) + 1
        return needed

    def can_append(self, seq_ids, num_new_tokens) -> bool:
        return self.num_blocks_to_append(seq_ids, num_new_tokens) <= len(self._free)

    def page_table(self, seq_ids):
        indptr, indices, last_page_len = [0], [], []
        for seq_id in seq_ids:
            indices += self._table(seq_id)
            indptr.append(len(indices))
            length = self._lengths[seq_id]
            last_page_len.append(0 if length == 0 else (length - 1) % self.block_size + 1)
        return tuple(np.array(xs, dtype=np.int32) for xs in (indptr, indices, last_page_len))

    def slot_mapping(self, seq_ids, num_new_tokens) -> np.ndarray:
        seq_ids, num_new_tokens = self._check_batch(seq_ids, num_new_tokens)
        slots = []
        for seq_id, n in zip(seq_ids, num_new_tokens, strict=True):
            length = self._lengths[seq_id]
            if n > length:
                raise ValueError(f"slot_mapping: sequence {seq_id} holds only {length} tokens, asked for {n}")
            slots += [self._slot(seq_id, pos) for pos in range(length - n, length)]
        return np.array(slots, dtype=np.int32)

    # -- mutations -------------------------------------------------------
    def allocate(self, num_tokens: int) -> int:
        if not self.can_allocate(num_tokens):
            raise OutOfBlocksError(f"allocate needs {self._blocks_for(num_tokens)} blocks, {len(self._free)} free")
        seq_id = self._next_id
        self._next_id += 1
        self._tables[seq_id] = [self._take() for _ in range(self._blocks_for(num_tokens))]
        self._lengths[seq_id] = num_tokens
        return seq_id

    def free(self, seq_id: int) -> None:
        self._release(self._table(seq_id))
        del self._tables[seq_id], self._lengths[seq_id]

    def fork(self, seq_id: int) -> int:
        table = list(self._table(seq_id))
        for block in table:
            self._refs[block] += 1
        child = self._next_id
        self._next_id += 1
        self._tables[child] = table
        self._lengths[child] = self._lengths[seq_id]
        return child

    def append(self, seq_ids, num_new_tokens):
        seq_ids, num_new_tokens = self._check_batch(seq_ids, num_new_tokens)
        needed = self.num_blocks_to_append(seq_ids, num_new_tokens)
        if needed > len(self._free):
            raise OutOfBlocksError(f"append needs {needed} blocks, {len(self._free)} free")
        slots, copies = [], []
        for seq_id, n in zip(seq_ids, num_new_tokens, strict=True):
            if n == 0:
                continue
            table, length = self._tables[seq_id], self._lengths[seq_id]
            if length % self.block_size and self._refs[table[-1]] > 1:
                own = self._take()
                self._refs[table[-1]] -= 1
                copies.append((table[-1], own))
                table[-1] = own
            for pos in range(length, length + n):
                if pos % self.block_size == 0:
                    table.append(self._take())
                slots.append(self._slot(seq_id, pos))
            self._lengths[seq_id] = length + n
        return np.array(slots, dtype=np.int32), np.array(copies, dtype=np.int32).reshape(-1, 2)

    def truncate(self, seq_ids, num_tokens) -> None:
        seq_ids, num_tokens = [int(s) for s in np.atleast_1d(seq_ids)], [int(n) for n in np.atleast_1d(num_tokens)]
        if len(seq_ids) != len(num_tokens):
            raise ValueError(f"seq_ids has {len(seq_ids)} entries but num_tokens has {len(num_tokens)}")
        self._check_unique_ids(seq_ids)
        for seq_id, n in zip(seq_ids, num_tokens, strict=True):
            if not 0 <= n <= self._lengths[seq_id]:
                raise ValueError(f"truncate: sequence {seq_id} has {self._lengths[seq_id]} tokens, cannot keep {n}")
        for seq_id, n in zip(seq_ids, num_tokens, strict=True):
            table, keep = self._tables[seq_id], self._blocks_for(n)
            self._release(table[keep:])
            del table[keep:]
            self._lengths[seq_id] = n

    def resample(self, seq_ids, ancestors) -> np.ndarray:
        seq_ids, ancestors = [int(s) for s in seq_ids], [int(a) for a in ancestors]
        self._check_unique_ids(seq_ids)
        if any(a < 0 or a >= len(seq_ids) for a in ancestors):
            raise ValueError(f"resample: ancestors must be in [0, {len(seq_ids)})")
        kept, new_ids = set(), []
        for a in ancestors:
            new_ids.append(self.fork(seq_ids[a]) if a in kept else seq_ids[a])
            kept.add(a)
        for i, seq_id in enumerate(seq_ids):
            if i not in kept:
                self.free(seq_id)
        return np.array(new_ids, dtype=np.int64)

    # -- internals -------------------------------------------------------
    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[int(seq_id)]
        except KeyError:
            raise KeyError(f"unknown or freed sequence id {seq_id}") from None

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _slot(self, seq_id: int, pos: int) -> int:
        return self._tables[seq_id][pos // self.block_size] * self.block_size + pos % self.block_size

    def _release(self, blocks) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def _take(self) -> int:
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _check_batch(self, seq_ids, num_new_tokens):
        """Lists of ints from one id and count, or from two sequences of them."""
        seq_ids = [int(s) for s in np.atleast_1d(seq_ids)]
        num_new_tokens = [int(n) for n in np.atleast_1d(num_new_tokens)]
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError(f"seq_ids has {len(seq_ids)} entries but num_new_tokens has {len(num_new_tokens)}")
        if any(n < 0 for n in num_new_tokens):
            raise ValueError(f"num_new_tokens must be >= 0, got {min(num_new_tokens)}")
        self._check_unique_ids(seq_ids)
        return seq_ids, num_new_tokens

    def _check_unique_ids(self, seq_ids) -> None:
        seen = set()
        for seq_id in seq_ids:
            self._table(seq_id)
            if seq_id in seen:
                raise ValueError(f"sequence id {seq_id} appears more than once")
            seen.add(seq_id)
