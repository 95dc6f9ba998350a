"""Each BlockManager operation, its errors, and that a failed call changes nothing."""

import numpy as np
import pytest

from pf_engine import BlockManager, OutOfBlocksError, PfEngineError
from pf_engine.block_manager_ref import PyBlockManager

MANAGERS = [BlockManager, PyBlockManager]
BLOCK_SIZES = [1, 4, 16]


def state(bm):
    """Everything observable about a manager, for before/after comparisons."""
    return (
        bm.num_free_blocks,
        bm.ref_counts().tolist(),
        {int(s): (bm.block_table(s).tolist(), bm.num_tokens(s)) for s in bm.seq_ids()},
    )


@pytest.mark.parametrize("cls", MANAGERS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33])
def test_allocate_takes_ceil_blocks(cls, block_size, num_tokens):
    bm = cls(64, block_size)
    seq = bm.allocate(num_tokens)
    expected = -(-num_tokens // block_size)
    assert len(bm.block_table(seq)) == expected
    assert bm.num_tokens(seq) == num_tokens
    assert bm.num_free_blocks == 64 - expected
    assert bm.block_table(seq).tolist() == list(range(expected))  # lowest blocks first
    bm.free(seq)
    assert bm.num_free_blocks == 64
    assert bm.ref_counts().tolist() == [0] * 64


@pytest.mark.parametrize("cls", MANAGERS)
def test_fork_shares_every_block(cls):
    bm = cls(16, 4)
    parent = bm.allocate(10)
    child = bm.fork(parent)
    assert child != parent
    assert bm.block_table(child).tolist() == bm.block_table(parent).tolist()
    assert bm.num_tokens(child) == 10
    assert bm.ref_counts()[bm.block_table(parent)].tolist() == [2, 2, 2]
    assert bm.num_free_blocks == 13  # nothing taken
    bm.free(parent)
    assert bm.ref_counts()[bm.block_table(child)].tolist() == [1, 1, 1]
    assert bm.num_free_blocks == 13


@pytest.mark.parametrize("cls", MANAGERS)
def test_unshared_blocks_count_each_sequence_as_its_own_copy(cls):
    bm = cls(16, 4)
    parent = bm.allocate(10)  # 3 blocks
    children = [bm.fork(parent) for _ in range(3)]
    bm.append([children[0]], [3])  # 13 tokens: 4 blocks of its own
    assert bm.num_unshared_blocks([parent, *children]) == 3 + 4 + 3 + 3
    assert bm.num_unshared_blocks(np.array(children[1:], dtype=np.int64)) == 6
    assert bm.num_unshared_blocks([]) == 0
    assert bm.num_free_blocks == 16 - 3 - 2  # forks took nothing; the append copied the partial block, added one
    with pytest.raises(KeyError):
        bm.num_unshared_blocks([12345])


@pytest.mark.parametrize("cls", MANAGERS)
def test_append_slots_and_new_blocks(cls):
    bm = cls(16, 4)
    seq = bm.allocate(3)  # block 0, slots 0..2
    slots, copies = bm.append(seq, 6)
    # slot 3 finishes block 0; blocks 1 and 2 follow
    assert slots.dtype == np.int32 and slots.tolist() == [3, 4, 5, 6, 7, 8]
    assert copies.shape == (0, 2)
    assert bm.block_table(seq).tolist() == [0, 1, 2]
    assert bm.num_tokens(seq) == 9
    assert bm.slot_mapping([seq], [9]).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert bm.slot_mapping([seq], [2]).tolist() == [7, 8]


@pytest.mark.parametrize("cls", MANAGERS)
def test_append_copies_a_shared_partial_block(cls):
    bm = cls(16, 4)
    parent = bm.allocate(6)  # blocks 0, 1; block 1 half full
    child = bm.fork(parent)
    slots, copies = bm.append(child, 1)
    assert copies.tolist() == [[1, 2]]  # the child's own copy of block 1
    assert bm.block_table(child).tolist() == [0, 2]
    assert bm.block_table(parent).tolist() == [0, 1]
    assert slots.tolist() == [2 * 4 + 2]
    assert bm.ref_counts()[:3].tolist() == [2, 1, 1]
    # The parent is now the block's only owner and writes in place.
    slots, copies = bm.append(parent, 1)
    assert copies.shape == (0, 2) and slots.tolist() == [1 * 4 + 2]


@pytest.mark.parametrize("cls", MANAGERS)
def test_append_after_full_block_needs_no_copy(cls):
    bm = cls(16, 4)
    parent = bm.allocate(8)
    children = [bm.fork(parent) for _ in range(3)]
    slots, copies = bm.append(children, [1, 1, 1])
    assert copies.shape == (0, 2)
    assert slots.tolist() == [8, 12, 16]  # each got a fresh block 2, 3, 4


@pytest.mark.parametrize("cls", MANAGERS)
def test_batch_append_copies_once_per_extra_owner(cls):
    bm = cls(16, 4)
    seqs = [bm.allocate(2)]
    seqs += [bm.fork(seqs[0]) for _ in range(3)]  # four owners of block 0
    assert bm.num_blocks_to_append(seqs, [1, 1, 1, 1]) == 3
    slots, copies = bm.append(seqs, [1, 1, 1, 1])
    # The first three copy block 0 away; the last is then its only owner.
    assert copies.tolist() == [[0, 1], [0, 2], [0, 3]]
    assert slots.tolist() == [6, 10, 14, 2]
    assert bm.ref_counts()[:4].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("cls", MANAGERS)
def test_resample_keeps_forks_and_frees(cls):
    bm = cls(32, 4)
    root = bm.allocate(5)
    gen = [root] + [bm.fork(root) for _ in range(3)]
    bm.append(gen, [2, 3, 4, 1])
    lengths = {s: bm.num_tokens(s) for s in gen}
    tables = {s: bm.block_table(s).tolist() for s in gen}
    new = bm.resample(gen, [2, 2, 0, 2])
    assert new.dtype == np.int64 and len(new) == 4
    assert new[0] == gen[2] and new[2] == gen[0]  # first pick keeps its id
    assert len(set(new.tolist())) == 4 and new[1] not in gen and new[3] not in gen
    for j, a in enumerate([2, 2, 0, 2]):
        assert bm.block_table(new[j]).tolist() == tables[gen[a]]
        assert bm.num_tokens(new[j]) == lengths[gen[a]]
    for dropped in (gen[1], gen[3]):
        with pytest.raises(KeyError):
            bm.num_tokens(dropped)
    assert sorted(bm.seq_ids().tolist()) == sorted(new.tolist())
    refs = np.zeros(32, dtype=np.int64)
    for s in new:
        np.add.at(refs, bm.block_table(s), 1)
    assert bm.ref_counts().tolist() == refs.tolist()
    for s in new:
        bm.free(s)
    assert bm.num_free_blocks == 32


@pytest.mark.parametrize("cls", MANAGERS)
def test_resample_to_other_sizes(cls):
    bm = cls(8, 4)
    gen = [bm.allocate(3) for _ in range(3)]
    assert bm.resample(gen, []).tolist() == []
    assert bm.num_free_blocks == 8 and bm.num_seqs == 0


@pytest.mark.parametrize("cls", MANAGERS)
def test_page_table_is_flashinfer_csr(cls):
    bm = cls(32, 4)
    a, b, c = bm.allocate(9), bm.allocate(4), bm.allocate(0)
    indptr, indices, last_page_len = bm.page_table([b, a, c])
    assert [x.dtype for x in (indptr, indices, last_page_len)] == [np.int32] * 3
    assert indptr.tolist() == [0, 1, 4, 4]
    assert indices.tolist() == bm.block_table(b).tolist() + bm.block_table(a).tolist()
    assert last_page_len.tolist() == [4, 1, 0]


@pytest.mark.parametrize("cls", MANAGERS)
def test_out_of_blocks_changes_nothing(cls):
    bm = cls(6, 4)
    a = bm.allocate(10)  # 3 blocks
    b = bm.fork(a)
    bm.append(b, 1)  # copy of block 2: 4 blocks taken
    before = state(bm)
    assert not bm.can_allocate(9)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks"):
        bm.allocate(9)
    assert state(bm) == before
    assert not bm.can_append([a, b], [4, 6])
    with pytest.raises(OutOfBlocksError):
        bm.append([a, b], [4, 6])  # a: copy + 1, b: 2 -> 4 > 2 free
    assert state(bm) == before
    assert issubclass(OutOfBlocksError, PfEngineError)


@pytest.mark.parametrize("cls", MANAGERS)
def test_append_to_the_last_free_block(cls):
    bm = cls(3, 4)
    a = bm.allocate(2)
    b = bm.fork(a)
    assert bm.can_append([a, b], [1, 1])  # one copy, then b owns block 0
    bm.append([a, b], [1, 5])
    assert bm.num_free_blocks == 0
    assert bm.can_append(b, 0)


@pytest.mark.parametrize("cls", MANAGERS)
def test_unknown_and_freed_ids_raise_key_error(cls):
    bm = cls(8, 4)
    s = bm.allocate(3)
    bm.free(s)
    for call in (
        lambda: bm.free(s),
        lambda: bm.fork(s),
        lambda: bm.append(s, 1),
        lambda: bm.num_tokens(12345),
        lambda: bm.page_table([s]),
        lambda: bm.resample([s], [0]),
    ):
        with pytest.raises(KeyError, match="unknown or freed sequence id"):
            call()
    assert bm.num_free_blocks == 8


@pytest.mark.parametrize("cls", MANAGERS)
def test_bad_arguments_raise_value_error_and_change_nothing(cls):
    bm = cls(8, 4)
    a, b = bm.allocate(3), bm.allocate(1)
    before = state(bm)
    for call, message in (
        (lambda: bm.allocate(-1), "must be >= 0"),
        (lambda: bm.append([a, b], [1]), "entries"),
        (lambda: bm.append([a, b], [1, -2]), "must be >= 0"),
        (lambda: bm.append([a, a], [1, 1]), "more than once"),
        (lambda: bm.resample([a, b], [0, 2]), r"\[0, 2\)"),
        (lambda: bm.resample([a, a], [0]), "more than once"),
        (lambda: bm.slot_mapping([a], [4]), "holds only 3"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
        assert state(bm) == before


def test_native_arguments_are_checked():
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size must be positive"):
        BlockManager(4, 0)
    with pytest.raises(ValueError, match="fit in int32"):
        BlockManager(2**28, 16)
    bm = BlockManager(8, 4)
    a = bm.allocate(1)
    with pytest.raises(TypeError, match="must hold integers, got dtype float64"):
        bm.append(np.array([a], dtype=np.float64), [1])
    with pytest.raises(ValueError, match="must be 1-D"):
        bm.append(np.array([[a]]), np.array([[1]]))
    # Any integer width and plain lists are accepted.
    slots, _ = bm.append(np.array([a], dtype=np.int32), np.array([2], dtype=np.uint8))
    assert slots.tolist() == [1, 2]
    assert bm.resample(np.array([a]), np.array([], dtype=np.int64)).tolist() == []


def test_returned_arrays_own_their_memory():
    bm = BlockManager(8, 4)
    a = bm.allocate(5)
    table = bm.block_table(a)
    indptr, indices, _ = bm.page_table([a])
    bm.free(a)
    bm.allocate(30)
    assert table.tolist() == [0, 1] and indices.tolist() == [0, 1] and indptr.tolist() == [0, 2]
