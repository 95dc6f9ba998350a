"""Reference attention: gather each sequence's pages and run masked SDPA. Any device."""

import torch
import torch.nn.functional as F

from pf_engine._native import _C
from pf_engine.attention.metadata import AttentionMetadata
from pf_engine.kv_cache import write_kv


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
        last_row = max(meta.positions.shape[0] - 1, 0)
        self.query_index = (meta.query_start[:-1, None].long() + lane[None, :]).clamp(max=last_row)
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


def _partial_attention(q, keys, values, mask, scale):
    """Softmax attention restricted to ``mask``, with its log-sum-exp for merging.

    q: [..., Hkv, R, D]; keys, values: [..., Hkv, L, D]; mask: broadcastable to [..., Hkv, R, L].
    Returns out [..., Hkv, R, D] (0 where nothing is visible) and lse [..., Hkv, R, 1].
    """
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ values
    return torch.where(torch.isfinite(lse), out, 0.0), lse


class CascadeDecodePlan:
    """Decode attention that reads a shared prompt once, not once per particle.

    Sequences whose first block is the same form a group (a problem's
    particles); the full blocks all members share are the group's prefix. Each
    query attends to its group's prefix (gathered once per group) and to its
    own remaining blocks, and the two softmax parts are merged by their
    log-sum-exp::

        particle a: [P0 P1 P2 a3 a4]      group prefix: P0 P1 P2 (read once)
        particle b: [P0 P1 P2 b3]         own blocks:   a3 a4 | b3 | c3 c4
        particle c: [P0 P1 P2 c3 c4]
    """

    def __init__(self, meta: AttentionMetadata, scale: float):
        self.meta, self.scale = meta, scale
        device = meta.seq_lens.device
        bs = meta.block_size
        tables = meta.block_tables.long()
        num_seqs, width = tables.shape
        seq_lens = meta.seq_lens.long()
        pages = (seq_lens + bs - 1) // bs
        full_pages = (seq_lens - 1) // bs  # the newest token's page is never shared
        _, group = torch.unique(tables[:, 0], return_inverse=True)
        num_groups = int(group.max()) + 1
        seq_index = torch.arange(num_seqs, device=device)
        leader = torch.full((num_groups,), num_seqs, device=device).scatter_reduce(0, group, seq_index, "amin")
        col = torch.arange(width, device=device)
        same = (tables == tables[leader[group]]) & (col[None, :] < full_pages[:, None])
        common = same.long().cumprod(dim=1).sum(dim=1)
        prefix_pages = torch.full((num_groups,), width, device=device).scatter_reduce(0, group, common, "amin")
        max_prefix = max(int(prefix_pages.max()), 1)
        self.prefix_tables = tables[leader, :max_prefix]  # [G, max_prefix]
        key = torch.arange(max_prefix * bs, device=device)
        self.prefix_mask = (key[None, :] < prefix_pages[:, None] * bs)[:, None, None, :]  # [G, 1, 1, Lp]

        # each sequence's own pages after its group's prefix
        own_start = prefix_pages[group]
        max_own = int((pages - own_start).max())
        own_col = own_start[:, None] + torch.arange(max_own, device=device)[None, :]
        self.own_tables = tables.gather(1, own_col.clamp(max=width - 1))  # [N, max_own]
        own_key = own_start[:, None] * bs + torch.arange(max_own * bs, device=device)[None, :]
        self.own_mask = (own_key < seq_lens[:, None])[:, None, None, :]  # [N, 1, 1, Lo]

        # queries side by side per group: sequence i sits in slot (group, rank within the group)
        order = torch.argsort(group, stable=True)
        group_start = torch.searchsorted(group[order], torch.arange(num_groups, device=device))
        rank = torch.empty_like(group)
        rank[order] = seq_index - group_start[group[order]]
        self.num_members = int(rank.max()) + 1
        self.num_groups = num_groups
        self.slot = group * self.num_members + rank  # [N]

    def attend(self, q, k, v, kv_layer):
        write_kv(kv_layer, self.meta.slot_mapping, k, v)
        num_seqs, num_q_heads, head_dim = q.shape
        num_kv_heads = kv_layer.shape[3]
        rep = num_q_heads // num_kv_heads
        groups, members = self.num_groups, self.num_members
        qf = q.float().view(num_seqs, num_kv_heads, rep, head_dim)

        def pages(table, kv):  # [B, P] block ids -> [B, Hkv, P * block_size, D] keys (kv=0) or values (1)
            out = kv_layer[:, kv].index_select(0, table.flatten()).float()
            return out.view(table.shape[0], -1, num_kv_heads, head_dim).transpose(1, 2)

        # the group's prefix, once for all its members' queries
        grouped = qf.new_zeros(groups * members, num_kv_heads, rep, head_dim)
        grouped[self.slot] = qf
        grouped = grouped.view(groups, members, num_kv_heads, rep, head_dim).transpose(1, 2)
        grouped = grouped.reshape(groups, num_kv_heads, members * rep, head_dim)
        out_p, lse_p = _partial_attention(grouped, pages(self.prefix_tables, 0), pages(self.prefix_tables, 1),
                                          self.prefix_mask, self.scale)

        def per_sequence(t):  # [G, Hkv, members * rep, X] -> [N, Hkv, rep, X]
            t = t.view(groups, num_kv_heads, members, rep, -1).transpose(1, 2)
            return t.reshape(groups * members, num_kv_heads, rep, -1)[self.slot]

        out_p, lse_p = per_sequence(out_p), per_sequence(lse_p)
        # each sequence's own pages
        out_o, lse_o = _partial_attention(qf, pages(self.own_tables, 0), pages(self.own_tables, 1),
                                          self.own_mask, self.scale)
        lse = torch.logaddexp(lse_p, lse_o)
        out = out_p * torch.exp(lse_p - lse) + out_o * torch.exp(lse_o - lse)
        return out.view(num_seqs, num_q_heads, head_dim).to(q.dtype)


class NativePlan:
    """Paged attention in one native pass (csrc/attention.cpp; CPU, float32), decode and prefill alike.

    Each new token is a query row that reads its sequence's keys and values up to its own
    position, where they lie in the cache: no gathered copy, no mask. A problem's particles run
    side by side, so their shared prompt blocks stay in cache::

        seq 0: 5 tokens, 2 new   ->  rows: (table of seq 0, 4 keys), (table of seq 0, 5 keys)
        seq 1: 9 tokens, 1 new   ->        (table of seq 1, 9 keys)
    """

    def __init__(self, meta: AttentionMetadata, scale: float):
        self.meta, self.scale = meta, scale
        if meta.is_decode:
            self.tables, self.lens = meta.block_tables.contiguous(), meta.seq_lens.contiguous()
        else:
            q_lens = (meta.query_start[1:] - meta.query_start[:-1]).long()
            owner = torch.repeat_interleave(torch.arange(meta.num_seqs), q_lens)
            self.tables = meta.block_tables[owner].contiguous()
            self.lens = (meta.positions + 1).to(torch.int32)

    def attend(self, q, k, v, kv_layer):
        write_kv(kv_layer, self.meta.slot_mapping, k, v)
        q = q.contiguous()
        out = torch.empty_like(q)
        num_seqs, num_q_heads, head_dim = q.shape
        _C.paged_decode_attention(
            q=q.data_ptr(), kv=kv_layer.data_ptr(), block_tables=self.tables.data_ptr(), seq_lens=self.lens.data_ptr(),
            out=out.data_ptr(), num_seqs=num_seqs, num_q_heads=num_q_heads, num_kv_heads=kv_layer.shape[3],
            head_dim=head_dim, block_size=kv_layer.shape[2], max_blocks=self.tables.shape[1], scale=self.scale,
            num_threads=torch.get_num_threads())
        return out


class TorchBackend:
    """Float32 on the CPU through NativePlan; elsewhere decode batches through CascadeDecodePlan and
    everything else through TorchPlan."""

    name = "torch"

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype):
        if dtype == torch.float32 and meta.seq_lens.device.type == "cpu":
            return NativePlan(meta, scale)
        return CascadeDecodePlan(meta, scale) if meta.is_decode else TorchPlan(meta, scale)
