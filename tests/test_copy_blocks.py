"""kernels/copy_blocks.py against its torch reference (pf_engine.kv_cache), and KVCache.copy_blocks."""

import numpy as np
import pytest
import torch

from pf_engine import KVCache
from pf_engine.kernels.copy_blocks import copy_blocks
from pf_engine.kv_cache import copy_blocks_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_LAYERS = [1, 3]
# (num_blocks, block shape): a non-power-of-two block, and one larger than the kernel's BLOCK
SHAPES = [(7, (2, 3, 1, 7)), (9, (2, 16, 4, 24))]
NUM_PAIRS = [1, 3]


def bits(t):
    """Compare copies bit for bit, NaN payloads and signed zeros included."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def mismatch(a, b):
    diff = (bits(a) != bits(b)).nonzero()
    return f"{len(diff)} elements differ, first at {diff[:5].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_layers", NUM_LAYERS)
@pytest.mark.parametrize("num_blocks,block_shape", SHAPES)
@pytest.mark.parametrize("num_pairs", NUM_PAIRS)
def test_kernel_equals_reference(dtype, num_layers, num_blocks, block_shape, num_pairs):
    gen = torch.Generator().manual_seed(num_pairs * 100 + num_layers)
    kv = torch.randn((num_layers, num_blocks, *block_shape), generator=gen).to(dtype).to(DEVICE)
    blocks = torch.randperm(num_blocks, generator=gen)[: 2 * num_pairs]
    pairs = blocks.view(2, num_pairs).T.contiguous().to(torch.int32).to(DEVICE)
    expected = kv.clone()
    copy_blocks_reference(expected, pairs)
    actual = kv.clone()
    copy_blocks(actual, pairs, block=256)
    assert torch.equal(bits(actual), bits(expected)), mismatch(actual, expected)
    untouched = [b for b in range(num_blocks) if b not in pairs[:, 1].tolist()]
    assert torch.equal(actual[:, untouched], kv[:, untouched])
    assert torch.equal(actual[:, pairs[:, 1].long()], kv[:, pairs[:, 0].long()])


def test_kernel_with_no_pairs_is_a_no_op():
    kv = torch.randn(2, 4, 8, device=DEVICE)
    before = kv.clone()
    copy_blocks(kv, torch.empty(0, 2, dtype=torch.int32, device=DEVICE))
    assert torch.equal(kv, before)


@pytest.mark.parametrize(
    "kv,pairs,message",
    [
        (torch.zeros(4, 8).T, torch.zeros(1, 2, dtype=torch.int32), "contiguous"),
        (torch.zeros(2, 4, 8), torch.zeros(1, 2, dtype=torch.int64), "int32"),
        (torch.zeros(2, 4, 8), torch.zeros(1, 3, dtype=torch.int32), r"\[num_pairs, 2\]"),
    ],
)
def test_launcher_checks_arguments(kv, pairs, message):
    with pytest.raises(ValueError, match=message):
        copy_blocks(kv, pairs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_copy_blocks_applies_append_copies(dtype):
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=8, block_size=4, dtype=dtype, device=DEVICE)
    bm = cache.manager
    parent = bm.allocate(6)
    k = torch.randn(6, 2, 4).to(dtype)
    for layer in range(2):
        cache.write(layer, bm.slot_mapping([parent], [6]), k + layer, -k)
    child = bm.fork(parent)
    slots, copies = bm.append(child, 1)
    assert copies.tolist() == [[1, 2]]
    cache.copy_blocks(copies)
    for layer in range(2):
        new = torch.full((1, 2, 4), 7.0, dtype=dtype)
        cache.write(layer, slots, new, new)
        ck, cv = cache.read(layer, child)
        pk, pv = cache.read(layer, parent)
        assert torch.equal(ck[:6].cpu(), (k + layer).to(dtype)) and torch.equal(ck[6].cpu(), new[0])
        assert torch.equal(pk.cpu(), (k + layer).to(dtype)) and torch.equal(pv.cpu(), -k)
        assert pk.shape == (6, 2, 4) and ck.shape == (7, 2, 4)


def test_kv_cache_rejects_bad_pairs():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=4, block_size=2, dtype=torch.float32)
    for pairs, message in (
        (np.array([[0, 4]]), r"outside \[0, 4\)"),
        (np.array([[0, 1], [1, 2]]), "both src and dst"),
        (np.array([[0, 2], [1, 2]]), "repeat a dst"),
        (np.array([[0.0, 1.0]]), "integers"),
        (np.array([0, 1]), r"\[num_copies, 2\]"),
    ):
        with pytest.raises(ValueError, match=message):
            cache.copy_blocks(pairs)


def test_kv_cache_checks_its_arguments():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        KVCache(num_layers=1, num_kv_heads=0, head_dim=2, num_blocks=4)
    cache = KVCache(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=4, block_size=2)
    seq = cache.manager.allocate(2)
    with pytest.raises(ValueError, match=r"k and v must be \[2, 2, 4\]"):
        cache.write(0, cache.manager.slot_mapping([seq], [2]), torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))
    assert cache.bytes_per_block == 1 * 2 * 2 * 2 * 4 * 2  # layers * K/V * block_size * heads * head_dim * fp16
