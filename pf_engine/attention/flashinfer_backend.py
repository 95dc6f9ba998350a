"""flashinfer's paged prefill and decode wrappers (CUDA only; imported only where flashinfer is)."""

import torch

from pf_engine.attention.metadata import AttentionMetadata
from pf_engine.kv_cache import write_kv

WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferPlan:
    def __init__(self, wrapper, slot_mapping):
        self.wrapper, self.slot_mapping = wrapper, slot_mapping

    def attend(self, q, k, v, kv_layer):
        write_kv(kv_layer, self.slot_mapping, k, v)
        return self.wrapper.run(q, kv_layer)


class FlashInferBackend:
    """kv_layer is flashinfer's NHD layout: [num_pages, 2, page_size, num_kv_heads, head_dim]."""

    name = "flashinfer"

    def __init__(self, device: torch.device):
        import flashinfer

        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> FlashInferPlan:
        pages = (meta.page_indptr, meta.page_indices, meta.last_page_len)
        if meta.is_decode:
            self.decode.plan(*pages, num_q_heads, num_kv_heads, head_dim, meta.block_size,
                             sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
            return FlashInferPlan(self.decode, meta.slot_mapping)
        self.prefill.plan(meta.query_start, *pages, num_q_heads, num_kv_heads, head_dim, meta.block_size,
                          causal=True, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
        return FlashInferPlan(self.prefill, meta.slot_mapping)
