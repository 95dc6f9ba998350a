"""Long random programs of allocate / append / fork / resample / free.

The native manager runs beside the plain-Python PyBlockManager and must agree
with it on every id, slot, copy and count; independently of both, reference
counts must equal the number of tables holding each block, and every token a
sequence wrote must read back from the KV cache after any fork and
copy-on-write.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pf_engine import KVCache, OutOfBlocksError
from pf_engine.block_manager_ref import PyBlockManager


def snapshot(bm):
    return (
        bm.num_free_blocks,
        bm.ref_counts().tolist(),
        {int(s): (bm.block_table(s).tolist(), bm.num_tokens(s)) for s in bm.seq_ids()},
    )


class BlockManagerPrograms(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 2, 3, 4, 8]))
    def setup(self, num_blocks, block_size):
        self.cache = KVCache(1, 1, 1, num_blocks, block_size, dtype=torch.float32)
        self.bm = self.cache.manager
        self.ref = PyBlockManager(num_blocks, block_size)
        self.tokens = {}  # seq_id -> the values it wrote, in order
        self.next_value = 1.0

    def both(self, method, *args):
        """Run one call on both managers; they must succeed alike or fail alike with nothing changed."""
        before = snapshot(self.bm)
        outcomes = []
        for bm in (self.bm, self.ref):
            try:
                outcomes.append(("ok", getattr(bm, method)(*args)))
            except (OutOfBlocksError, KeyError, ValueError) as exc:
                outcomes.append(("error", type(exc)))
        (kind, native), (ref_kind, ref) = outcomes
        assert kind == ref_kind, f"{method}{args}: native {outcomes[0]} vs reference {outcomes[1]}"
        if kind == "error":
            assert native == ref
            assert snapshot(self.bm) == before
            return None
        return native, ref

    def write(self, seq_ids, counts, slots):
        values = torch.arange(sum(counts), dtype=torch.float32) + self.next_value
        self.next_value += sum(counts)
        self.cache.write(0, slots, values.view(-1, 1, 1), -values.view(-1, 1, 1))
        start = 0
        for seq_id, n in zip(seq_ids, counts, strict=True):
            self.tokens[seq_id] = self.tokens[seq_id] + values[start : start + n].tolist()
            start += n

    def live(self):
        return sorted(self.tokens)

    @rule(num_tokens=st.integers(0, 20))
    def allocate(self, num_tokens):
        result = self.both("allocate", num_tokens)
        if result:
            native, ref = result
            assert native == ref
            self.tokens[native] = []
            self.write([native], [num_tokens], self.bm.slot_mapping([native], [num_tokens]))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.live()), unique=True, min_size=1))
        counts = data.draw(st.lists(st.integers(0, 9), min_size=len(seq_ids), max_size=len(seq_ids)))
        expected_blocks = self.ref.num_blocks_to_append(seq_ids, counts)
        assert self.bm.num_blocks_to_append(seq_ids, counts) == expected_blocks
        free_before = self.bm.num_free_blocks
        result = self.both("append", seq_ids, counts)
        if result:
            (slots, copies), (ref_slots, ref_copies) = result
            assert slots.tolist() == ref_slots.tolist() and copies.tolist() == ref_copies.tolist()
            assert free_before - self.bm.num_free_blocks == expected_blocks
            self.cache.copy_blocks(copies)
            self.write(seq_ids, counts, slots)
        else:
            assert expected_blocks > free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live()))
        native, ref = self.both("fork", parent)
        assert native == ref
        self.tokens[native] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def resample(self, data):
        gen = data.draw(st.lists(st.sampled_from(self.live()), unique=True, min_size=1))
        ancestors = data.draw(st.lists(st.integers(0, len(gen) - 1), max_size=len(gen) + 2))
        native, ref = self.both("resample", gen, ancestors)
        assert native.tolist() == ref.tolist()
        new_tokens = {s: t for s, t in self.tokens.items() if s not in gen}
        for child, a in zip(native.tolist(), ancestors, strict=True):
            new_tokens[child] = list(self.tokens[gen[a]])
        self.tokens = new_tokens

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.live()), unique=True, min_size=1))
        keep = [data.draw(st.integers(0, len(self.tokens[s]))) for s in seq_ids]
        self.both("truncate", seq_ids, keep)
        for seq_id, n in zip(seq_ids, keep, strict=True):
            self.tokens[seq_id] = self.tokens[seq_id][:n]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(self.live()))
        self.both("free", seq_id)
        del self.tokens[seq_id]

    @rule(data=st.data())
    def bad_call(self, data):
        """Freed ids, duplicates, out-of-range ancestors: both refuse, nothing changes."""
        gone = self.bm.seq_ids().max(initial=-1) + 1 + data.draw(st.integers(0, 3))
        live = self.live()
        calls = [("free", gone), ("fork", gone), ("append", [gone], [1]), ("resample", live + [gone], [0]),
                 ("truncate", [gone], [0])]
        if live:
            longer = len(self.tokens[live[0]]) + 1
            calls += [("append", [live[0], live[0]], [1, 1]), ("resample", live, [len(live)]),
                      ("truncate", [live[0]], [longer]), ("truncate", [live[0]], [-1]),
                      ("truncate", [live[0], live[0]], [0, 0]), ("truncate", [live[0]], [0, 0])]
        method, *args = data.draw(st.sampled_from(calls))
        assert self.both(method, *args) is None

    @invariant()
    def agrees_with_reference(self):
        assert snapshot(self.bm) == snapshot(self.ref)

    @invariant()
    def ref_counts_count_tables(self):
        refs = np.zeros(self.bm.num_blocks, dtype=np.int64)
        for seq_id in self.bm.seq_ids():
            np.add.at(refs, self.bm.block_table(seq_id), 1)
        assert self.bm.ref_counts().tolist() == refs.tolist()
        assert self.bm.num_free_blocks == int((refs == 0).sum())
        assert set(self.bm.seq_ids().tolist()) == set(self.tokens)

    @invariant()
    def every_token_reads_back(self):
        for seq_id, expected in self.tokens.items():
            k, v = self.cache.read(0, seq_id)
            assert k.flatten().tolist() == expected, f"sequence {seq_id}"
            assert v.flatten().tolist() == [-x for x in expected]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq_id in self.live():
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert not self.bm.ref_counts().any()


BlockManagerPrograms.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_programs = BlockManagerPrograms.TestCase


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_long_particle_filter_run_reads_back(block_size):
    """Hundreds of generations of one problem's particles: a deep fork tree stays consistent."""
    rng = np.random.default_rng(block_size)
    cache = KVCache(1, 1, 1, num_blocks=512, block_size=block_size, dtype=torch.float32)
    bm, ref = cache.manager, PyBlockManager(512, block_size)
    prompt = bm.allocate(5)
    ref.allocate(5)
    cache.write(0, bm.slot_mapping([prompt], [5]), torch.ones(5, 1, 1), torch.ones(5, 1, 1))
    tokens = {prompt: [1.0] * 5}
    particles = [prompt] + [bm.fork(prompt) for _ in range(7)]
    for _ in range(7):
        ref.fork(prompt)
    for s in particles[1:]:
        tokens[s] = list(tokens[prompt])
    for step in range(200):
        counts = rng.integers(1, 4, size=len(particles)).tolist()
        slots, copies = bm.append(particles, counts)
        ref_slots, ref_copies = ref.append(particles, counts)
        assert slots.tolist() == ref_slots.tolist() and copies.tolist() == ref_copies.tolist()
        cache.copy_blocks(copies)
        values = torch.arange(len(slots), dtype=torch.float32) + 10 * step + 2
        cache.write(0, slots, values.view(-1, 1, 1), values.view(-1, 1, 1))
        start = 0
        for s, n in zip(particles, counts, strict=True):
            tokens[s] = tokens[s] + values[start : start + n].tolist()
            start += n
        ancestors = np.sort(rng.integers(0, len(particles), size=len(particles)))
        new = bm.resample(particles, ancestors)
        assert new.tolist() == ref.resample(particles, ancestors).tolist()
        tokens = {c: list(tokens[particles[a]]) for c, a in zip(new.tolist(), ancestors, strict=True)}
        particles = new.tolist()
        if step % 40 == 39:  # trajectories end, a new round starts from the survivors
            for s in particles:
                k, _ = cache.read(0, s)
                assert k.flatten().tolist() == tokens[s]
    assert snapshot(bm) == snapshot(ref)
    for s in particles:
        bm.free(s)
    assert bm.num_free_blocks == 512
