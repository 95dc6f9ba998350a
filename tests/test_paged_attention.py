"""kernels/paged_attention.py against its torch reference, and the triton backend against torch."""

import pytest
import torch

from pf_engine.kernels.paged_attention import paged_decode, paged_decode_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (num_q_heads, num_kv_heads, head_dim): MHA, GQA with a non-power-of-two group, MQA
HEADS = [(4, 4, 16), (6, 2, 32), (3, 1, 24)]
BLOCK_SIZES = [4, 16, 5]
SEQ_LENS = [[1, 7, 33], [64]]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("seq_lens", SEQ_LENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_kernel_equals_reference(heads, block_size, seq_lens, dtype):
    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(block_size)
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = len(seq_lens) * max_blocks + 3
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    # each sequence gets its own shuffled blocks; padding entries point at block 0
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        used = -(-n // block_size)
        tables[i, :used] = perm[i * max_blocks : i * max_blocks + used].int()
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    tables = tables.to(DEVICE)
    out = paged_decode(q, kv, tables, lens, head_dim**-0.5)
    ref = paged_decode_reference(q, kv, tables, lens, head_dim**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_launcher_checks_shapes():
    q = torch.zeros(2, 4, 8)
    kv = torch.zeros(3, 2, 4, 3, 8)  # 4 query heads do not split over 3 KV heads
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode(q, kv, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0)
    kv = torch.zeros(3, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="int32"):
        paged_decode(q, kv, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="must have 2 rows"):
        paged_decode(q, kv, torch.zeros(3, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0)
