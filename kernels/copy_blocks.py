"""Copy-on-write block copies for every layer of a paged KV cache in one launch.

Its plain-torch reference (the CPU path) is pf_engine.kv_cache.copy_blocks_reference.
"""

import torch
import triton
import triton.language as tl

# Copies move bits, so the cache is viewed as integers of the same width:
# the interpreter mishandles bfloat16, and no rounding can sneak in.
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# grid: (num_pairs, num_layers)
# kv_ptr:    [num_layers, num_blocks, block_numel] integers of the cache's width
# pairs_ptr: [num_pairs, 2] int32 (src, dst) block ids
@triton.jit
def _copy_blocks_kernel(kv_ptr, pairs_ptr, layer_stride, block_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    src = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)
    layer_ptr = kv_ptr + layer * layer_stride
    for start in range(0, block_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < block_numel
        vals = tl.load(layer_ptr + src * block_numel + offs, mask=mask)
        tl.store(layer_ptr + dst * block_numel + offs, vals, mask=mask)


def check_copy_args(kv: torch.Tensor, pairs: torch.Tensor) -> None:
    """The launcher's shape, dtype and device checks.

    kv: [num_layers, num_blocks, ...] contiguous; pairs: int32 [num_pairs, 2] on kv's device.
    """
    if kv.dim() < 2 or not kv.is_contiguous():
        raise ValueError(f"kv must be a contiguous [num_layers, num_blocks, ...] tensor, got shape {tuple(kv.shape)}")
    if pairs.dtype != torch.int32 or pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be int32 [num_pairs, 2], got {pairs.dtype} {tuple(pairs.shape)}")
    if pairs.device != kv.device:
        raise ValueError(f"pairs is on {pairs.device} but kv is on {kv.device}")


def copy_blocks(kv: torch.Tensor, pairs: torch.Tensor, block: int = 1024) -> None:
    """kv[:, dst] = kv[:, src] for every (src, dst) row of ``pairs``, in place, one launch.

    Parameters
    ----------
    kv : torch.Tensor
        [num_layers, num_blocks, ...] contiguous, any dtype.
    pairs : torch.Tensor
        int32 [num_pairs, 2] on kv's device; no block may be both a src and a dst.
    """
    check_copy_args(kv, pairs)
    if pairs.shape[0] == 0:
        return
    num_layers, num_blocks = kv.shape[:2]
    flat = kv.view(_SAME_WIDTH_INT[kv.element_size()]).view(num_layers, num_blocks, -1)
    grid = (pairs.shape[0], num_layers)
    _copy_blocks_kernel[grid](flat, pairs.contiguous(), flat.stride(0), flat.shape[2], BLOCK=block)
