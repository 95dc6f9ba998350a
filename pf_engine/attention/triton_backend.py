"""Decode batches through the Triton paged-decode kernel; prefill through the torch path."""

from pf_engine.attention.metadata import AttentionMetadata
from pf_engine.attention.torch_backend import TorchPlan
from pf_engine.kv_cache import write_kv


class TritonDecodePlan:
    def __init__(self, meta: AttentionMetadata, scale: float):
        from pf_engine.kernels.paged_attention import paged_decode

        self.meta, self.scale, self._decode = meta, scale, paged_decode

    def attend(self, q, k, v, kv_layer):
        write_kv(kv_layer, self.meta.slot_mapping, k, v)
        return self._decode(q, kv_layer, self.meta.block_tables, self.meta.seq_lens, self.scale)


class TritonBackend:
    """An AttentionBackend: decode batches through TritonDecodePlan, everything else through TorchPlan."""

    name = "triton"

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype):
        return TritonDecodePlan(meta, scale) if meta.is_decode else TorchPlan(meta, scale)
