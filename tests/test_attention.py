"""The torch backend's fast paths (the native pass over the paged cache, for decode and prefill;
shared prefixes read once) against its plain gather path."""

import numpy as np
import pytest
import torch

from pf_engine import KVCache
from pf_engine._native import _C
from pf_engine.attention import build_metadata
from pf_engine.attention.torch_backend import CascadeDecodePlan, NativePlan, TorchBackend, TorchPlan

# (prompt lengths of the problems, particles per problem, decode rounds before the checked one)
LAYOUTS = [([37], 8, 3), ([5, 16, 23], 4, 2), ([3], 1, 0), ([40, 1], 3, 5)]
BLOCK_SIZES = [4, 16]


# (query heads, kv heads, head dim): grouped queries, one head each, a head dim off the 8-lane sums
# (these two take the portable pass); one 16-lane vector, SmolLM2's heads, 128-wide (the AVX-512 pass)
HEADS = [(6, 2, 8), (3, 3, 13), (2, 1, 16), (9, 3, 64), (8, 2, 128)]
# one token, a partial block, one block, several; one 16-token chunk, one more, many chunks
SEQ_LENS = [1, 4, 5, 17, 33, 16, 32, 150]


@pytest.mark.parametrize("prompts,particles,rounds", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("plan_class", [CascadeDecodePlan, NativePlan])
def test_decode_paths_equal_gathering_every_page(prompts, particles, rounds, block_size, plan_class):
    gen = torch.Generator().manual_seed(block_size + rounds)
    cache = KVCache(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=256, block_size=block_size,
                    dtype=torch.float32)
    bm = cache.manager
    cache.kv.normal_(generator=gen)  # unwritten slots hold noise that must never be read
    seqs = []
    for n in prompts:
        root = bm.allocate(n)
        seqs += [root] + [bm.fork(root) for _ in range(particles - 1)]
    rng = np.random.default_rng(block_size)
    for _ in range(rounds):
        bm.append(seqs, rng.integers(1, 4, size=len(seqs)))  # copies would move noise; none is checked here
        if particles > 1:  # resample within each problem
            ancestors = np.concatenate([rng.integers(0, particles, particles) + i * particles
                                        for i in range(len(prompts))])
            seqs = bm.resample(seqs, ancestors).tolist()
    ones = np.ones(len(seqs), dtype=np.int64)
    slots, copies = bm.append(seqs, ones)
    cache.copy_blocks(copies)
    meta = build_metadata(bm, seqs, ones, slots, "cpu")
    assert meta.is_decode
    q = torch.randn(len(seqs), 6, 8, generator=gen)
    k, v = torch.randn(len(seqs), 2, 8, generator=gen), torch.randn(len(seqs), 2, 8, generator=gen)
    expected = TorchPlan(meta, 0.3).attend(q, k, v, cache.kv[0].clone())
    plan = plan_class(meta, 0.3)
    if plan_class is CascadeDecodePlan and particles > 1 and max(prompts) >= 2 * block_size:
        assert plan.prefix_mask.any(), "no prompt block was read as a shared prefix"
    torch.testing.assert_close(plan.attend(q, k, v, cache.kv[0]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_decode_on_every_head_shape_and_thread_count(num_q_heads, num_kv_heads, head_dim, threads,
                                                           native_threads):
    gen = torch.Generator().manual_seed(head_dim + threads)
    cache = KVCache(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=128, block_size=5,
                    dtype=torch.float32)
    cache.kv.normal_(generator=gen)
    bm = cache.manager
    seqs = [bm.allocate(n - 1) for n in SEQ_LENS]
    ones = np.ones(len(seqs), dtype=np.int64)
    slots, _ = bm.append(seqs, ones)
    meta = build_metadata(bm, seqs, ones, slots, "cpu")
    q = torch.randn(len(seqs), num_q_heads, head_dim, generator=gen)
    k = torch.randn(len(seqs), num_kv_heads, head_dim, generator=gen)
    v = torch.randn(len(seqs), num_kv_heads, head_dim, generator=gen)
    expected = TorchPlan(meta, head_dim**-0.5).attend(q, k, v, cache.kv[0].clone())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = NativePlan(meta, head_dim**-0.5).attend(q, k, v, cache.kv[0])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# (tokens already cached, new tokens) per sequence of one batch: prompts, chunks after a cached
# prefix, single decode tokens beside them
MIXED_BATCHES = [[(0, 1)], [(0, 37)], [(0, 5), (12, 1), (3, 16), (40, 33)], [(7, 2), (0, 150)]]


@pytest.mark.parametrize("batch", MIXED_BATCHES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", HEADS)
def test_native_prefill_equals_the_masked_gather(batch, num_q_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(len(batch) + head_dim)
    cache = KVCache(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=128, block_size=5,
                    dtype=torch.float32)
    cache.kv.normal_(generator=gen)
    bm = cache.manager
    seqs = [bm.allocate(cached) for cached, _ in batch]
    counts = np.array([new for _, new in batch], dtype=np.int64)
    slots, _ = bm.append(seqs, counts)
    meta = build_metadata(bm, seqs, counts, slots, "cpu")
    n = int(counts.sum())
    q = torch.randn(n, num_q_heads, head_dim, generator=gen)
    k, v = (torch.randn(n, num_kv_heads, head_dim, generator=gen) for _ in range(2))
    expected = TorchPlan(meta, head_dim**-0.5).attend(q, k, v, cache.kv[0].clone())
    plan = TorchBackend().plan(meta, head_dim**-0.5, num_q_heads, num_kv_heads, head_dim, torch.float32)
    assert isinstance(plan, NativePlan)
    torch.testing.assert_close(plan.attend(q, k, v, cache.kv[0]), expected, atol=1e-5, rtol=1e-5)


def test_the_avx512_pass_runs_where_the_cpu_has_it():
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert [_C.decode_attention_pass(head_dim=d) for d in (16, 64, 128)] == ["avx512" if avx512 else "portable"] * 3
    assert [_C.decode_attention_pass(head_dim=d) for d in (8, 13, 144)] == ["portable"] * 3


def test_the_backend_takes_the_native_pass_for_float32_decode_on_the_cpu():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=8, block_size=4, dtype=torch.float32)
    seq = cache.manager.allocate(3)
    slots, _ = cache.manager.append([seq], [1])
    decode = build_metadata(cache.manager, [seq], [1], slots, "cpu")
    assert isinstance(TorchBackend().plan(decode, 0.5, 1, 1, 4, torch.float32), NativePlan)
    assert isinstance(TorchBackend().plan(decode, 0.5, 1, 1, 4, torch.bfloat16), CascadeDecodePlan)
    slots, _ = cache.manager.append([seq], [3])
    prefill = build_metadata(cache.manager, [seq], [3], slots, "cpu")
    assert isinstance(TorchBackend().plan(prefill, 0.5, 1, 1, 4, torch.float32), NativePlan)
    assert isinstance(TorchBackend().plan(prefill, 0.5, 1, 1, 4, torch.bfloat16), TorchPlan)
