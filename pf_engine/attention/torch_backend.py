"""Reference attention: gather each sequence's pages and run masked SDPA. Any device."""

import torch
import torch.nn.functional as F

from pf_engine.attention.metadata import AttentionMetadata


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys and values. kv_layer: [num_blocks, 2, block_size, H, D]; k, v: [num_tokens, H, D]."""
    block_size = kv_layer.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_layer[blocks, 0, offsets] = k.to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v.to(kv_layer.dtype)


class TorchPlan:
    """One batch's index tensors, computed once and shared by every layer."""

    def __init__(self, meta: AttentionMetadata, scale: float):
        self.meta = meta
        self.scale = scale
        device = meta.seq_lens.device
        num_seqs, max_q = meta.num_seqs, max(meta.max_query_len, 1)
        q_lens = (meta.query_start[1:] - meta.query_start[:-1]).long()
        lane = torch.arange(max_q, device=device)
        self.query_mask = lane[None, :] < q_lens[:, None]  # [num_seqs, max_q]
        self.query_index = (meta.query_start[:-1, None].long() + lane[None, :]).clamp(max=max(meta.positions.shape[0] - 1, 0))
        num_keys = meta.block_tables.shape[1] * meta.block_size
        key_pos = torch.arange(num_keys, device=device)
        query_pos = meta.seq_lens[:, None].long() - q_lens[:, None] + lane[None, :]  # [num_seqs, max_q]
        # a query sees keys up to its own position; padded queries see key 0 only (their rows are dropped)
        self.attn_mask = (key_pos[None, None, :] <= query_pos[:, :, None]) | (key_pos[None, None, :] == 0)
        self.attn_mask = self.attn_mask[:, None]  # [num_seqs, 1, max_q, num_keys]
        self.num_seqs, self.max_q = num_seqs, max_q

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, Hq, D]; k, v: [num_tokens, Hkv, D]; returns [num_tokens, Hq, D]."""
        write_kv(kv_layer, self.meta.slot_mapping, k, v)
        pages = kv_layer[self.meta.block_tables.long()]  # [num_seqs, max_blocks, 2, block_size, Hkv, D]
        num_seqs, _, _, _, num_kv_heads, head_dim = pages.shape
        keys = pages[:, :, 0].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
        values = pages[:, :, 1].reshape(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
        queries = q[self.query_index].transpose(1, 2)  # [num_seqs, Hq, max_q, D]
        out = F.scaled_dot_product_attention(
            queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=self.attn_mask, scale=self.scale,
            enable_gqa=queries.shape[1] != num_kv_heads,
        )
        return out.transpose(1, 2)[self.query_mask]


class TorchBackend:
    name = "torch"

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> TorchPlan:
        return TorchPlan(meta, scale)
