"""Paged decode attention: one new query per sequence against its paged keys and values."""

import torch
import triton
import triton.language as tl


# grid: (num_seqs, num_kv_heads)
# q_ptr:            [num_seqs, num_kv_heads * GROUP, HEAD_DIM]
# kv_ptr:           [num_blocks, 2, BLOCK_SIZE, num_kv_heads, HEAD_DIM] one layer (K at 0, V at 1)
# block_tables_ptr: [num_seqs, max_blocks] int32
# seq_lens_ptr:     [num_seqs] int32
# out_ptr:          [num_seqs, num_kv_heads * GROUP, HEAD_DIM]
@triton.jit
def _paged_decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, scale,
    stride_table, stride_block, stride_kv, stride_token, stride_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_SIZE_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_q_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    t = tl.arange(0, BLOCK_SIZE_PAD)
    q_rows = (seq * num_q_heads + kv_head * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + q_rows, mask=q_mask, other=0.0).to(tl.float32)

    # online softmax over the sequence's pages
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for page in range(tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_table + page).to(tl.int64)
        token_mask = (page * BLOCK_SIZE + t < seq_len) & (t < BLOCK_SIZE)
        kv_mask = token_mask[:, None] & (d < HEAD_DIM)[None, :]
        base = kv_ptr + block * stride_block + kv_head * stride_head + t[:, None] * stride_token + d[None, :]
        k = tl.load(base, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(base + stride_kv, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE_PAD]
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + q_rows, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Decode attention of one query per sequence over its pages.

    Parameters
    ----------
    q : [num_seqs, num_q_heads, head_dim]
    kv_layer : [num_blocks, 2, block_size, num_kv_heads, head_dim], contiguous
    block_tables : int32 [num_seqs, max_blocks]
    seq_lens : int32 [num_seqs], each >= 1 (the new token is already in the cache)

    Returns [num_seqs, num_q_heads, head_dim] in q's dtype.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, two, block_size, num_kv_heads, kv_dim = kv_layer.shape
    if two != 2 or kv_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"kv_layer {list(kv_layer.shape)} does not fit q {list(q.shape)}")
    if not kv_layer.is_contiguous():
        raise ValueError("kv_layer must be contiguous")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {list(block_tables.shape)} and seq_lens {list(seq_lens.shape)} "
                         f"must have {num_seqs} rows")
    if len({q.device, kv_layer.device, block_tables.device, seq_lens.device}) != 1:
        raise ValueError("q, kv_layer, block_tables and seq_lens must be on one device")
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(q)
    group = num_q_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, kv_layer, block_tables, seq_lens, out, scale,
        block_tables.stride(0), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_SIZE_PAD=triton.next_power_of_2(block_size),
    )
    return out


def paged_decode_reference(q, kv_layer, block_tables, seq_lens, scale) -> torch.Tensor:
    """Torch reference of :func:`paged_decode`: gather pages, softmax in float32."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    pages = kv_layer[block_tables.long()].float()  # [num_seqs, max_blocks, 2, block_size, Hkv, D]
    keys = pages[:, :, 0].reshape(num_seqs, -1, num_kv_heads, head_dim).repeat_interleave(group, 2)
    values = pages[:, :, 1].reshape(num_seqs, -1, num_kv_heads, head_dim).repeat_interleave(group, 2)
    scores = torch.einsum("shd,sthd->sht", q.float(), keys) * scale
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("sht,sthd->shd", scores.softmax(-1), values).to(q.dtype)
