"""flashinfer's paged prefill and decode wrappers (CUDA only; imported only where flashinfer is).

Checked against flashinfer-python 0.6.0 to 0.7.4 (tests/test_flashinfer_api.py binds every call
below to the installed flashinfer's signatures).
"""

import torch

from pf_engine.attention.metadata import AttentionMetadata
from pf_engine.kv_cache import write_kv

WORKSPACE_BYTES = 128 * 1024 * 1024

# The GQA group sizes (num_q_heads // num_kv_heads) flashinfer's CUDA-core decode kernels are
# compiled for (DISPATCH_GQA_GROUP_SIZE in include/flashinfer/utils.cuh: 1, 2, 3, 4, 8 in 0.6.0;
# later releases add 6 and 16). Any other group raises "Unsupported group_size" there, so it
# must take the tensor-core path (Qwen2.5-Math-1.5B: group 6; Qwen2.5-Math-7B and PRM-7B: 7).
CUDA_CORE_DECODE_GROUP_SIZES = frozenset({1, 2, 3, 4, 8})
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def decode_use_tensor_cores(kv_dtype: torch.dtype, num_q_heads: int, num_kv_heads: int) -> bool:
    """Whether decode runs flashinfer's tensor-core (prefill) kernels rather than its CUDA-core ones.

    Always where the CUDA-core kernels lack the group size; otherwise as SGLang decides it: fp8
    caches always, fp16/bf16 caches once a group of at least 4 query heads fills the MMA tile's
    rows (the kernel fuses the group with the token dimension), other dtypes never.
    """
    group_size = num_q_heads // num_kv_heads
    if group_size not in CUDA_CORE_DECODE_GROUP_SIZES:
        return True
    if kv_dtype in FP8_DTYPES:
        return True
    return kv_dtype in HALF_DTYPES and group_size >= 4


class FlashInferPlan:
    """One batch's attention plan, shared by every layer.

    flashinfer's plan() needs the KV cache's dtype (``kv_data_type``), which arrives with the
    first layer's ``kv_layer``; so it runs there, once per batch, and later layers reuse it.
    NOTE: the wrapper holds one plan at a time: attend with a plan before planning the next batch.
    """

    def __init__(self, backend: "FlashInferBackend", meta: AttentionMetadata, scale: float,
                 heads: tuple[int, int, int], q_dtype: torch.dtype):
        self.backend, self.meta, self.scale, self.heads, self.q_dtype = backend, meta, scale, heads, q_dtype
        self.wrapper = None
        self.kv_dtype = None

    def attend(self, q, k, v, kv_layer):
        write_kv(kv_layer, self.meta.slot_mapping, k, v)
        if self.wrapper is None:
            self.wrapper = self.backend.planned_wrapper(self, kv_layer.dtype)
            self.kv_dtype = kv_layer.dtype
        elif kv_layer.dtype != self.kv_dtype:
            raise ValueError(f"every layer's KV cache must have one dtype: {self.kv_dtype}, then {kv_layer.dtype}")
        return self.wrapper.run(q, kv_layer)


class FlashInferBackend:
    """kv_layer is flashinfer's NHD layout: [num_pages, 2, page_size, num_kv_heads, head_dim].

    ``lib`` is the flashinfer module (tests pass a stand-in with its two wrapper classes). The
    wrappers share one workspace and are built on first use, once the head counts and the
    cache's dtype are known: whether decode uses tensor cores is fixed when its wrapper is built.
    """

    name = "flashinfer"

    def __init__(self, device: torch.device, lib=None):
        if lib is None:
            import flashinfer as lib
        self.lib = lib
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = None
        self.decode = {}  # use_tensor_cores -> BatchDecodeWithPagedKVCacheWrapper

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> FlashInferPlan:
        """``dtype`` is the queries'; the cache's own dtype is read from the first layer's cache."""
        return FlashInferPlan(self, meta, scale, (num_q_heads, num_kv_heads, head_dim), dtype)

    def planned_wrapper(self, plan: FlashInferPlan, kv_dtype: torch.dtype):
        """The wrapper for ``plan``'s batch, after flashinfer's plan() for it."""
        meta, (num_q_heads, num_kv_heads, head_dim) = plan.meta, plan.heads
        pages = (meta.page_indptr, meta.page_indices, meta.last_page_len)
        dtypes = {"q_data_type": plan.q_dtype, "kv_data_type": kv_dtype}
        if meta.is_decode:
            tensor_cores = decode_use_tensor_cores(kv_dtype, num_q_heads, num_kv_heads)
            if tensor_cores not in self.decode:
                self.decode[tensor_cores] = self.lib.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=tensor_cores)
            wrapper = self.decode[tensor_cores]
            wrapper.plan(*pages, num_q_heads, num_kv_heads, head_dim, meta.block_size,
                         sm_scale=plan.scale, **dtypes)
            return wrapper
        if self.prefill is None:
            self.prefill = self.lib.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.prefill.plan(meta.query_start, *pages, num_q_heads, num_kv_heads, head_dim, meta.block_size,
                          causal=True, sm_scale=plan.scale, **dtypes)
        return self.prefill
