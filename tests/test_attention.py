"""The torch backend's decode path (shared prefixes read once) against its plain gather path."""

import numpy as np
import pytest
import torch

from pf_engine import KVCache
from pf_engine.attention import build_metadata
from pf_engine.attention.torch_backend import CascadeDecodePlan, TorchPlan

# (prompt lengths of the problems, particles per problem, decode rounds before the checked one)
LAYOUTS = [([37], 8, 3), ([5, 16, 23], 4, 2), ([3], 1, 0), ([40, 1], 3, 5)]
BLOCK_SIZES = [4, 16]


@pytest.mark.parametrize("prompts,particles,rounds", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_cascade_decode_equals_gathering_every_page(prompts, particles, rounds, block_size):
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
    plan = CascadeDecodePlan(meta, 0.3)
    if particles > 1 and max(prompts) >= 2 * block_size:
        assert plan.prefix_mask.any(), "no prompt block was read as a shared prefix"
    torch.testing.assert_close(plan.attend(q, k, v, cache.kv[0]), expected, atol=1e-5, rtol=1e-5)
