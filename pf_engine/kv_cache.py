"""Paged K/V tensors for every layer, handed out by the native BlockManager."""

import numpy as np
import torch

from pf_engine import _native
from pf_engine._native import _C


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys and values. kv_layer: [num_blocks, 2, block_size, H, D]; k, v: [num_tokens, H, D]."""
    block_size = kv_layer.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_layer[blocks, 0, offsets] = k.to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v.to(kv_layer.dtype)


def copy_blocks_reference(kv: torch.Tensor, pairs: torch.Tensor) -> None:
    """kv[:, dst] = kv[:, src] for every (src, dst) row of int [num_pairs, 2] ``pairs``, in plain
    torch: the CPU path, and the oracle of the Triton and CUDA copies."""
    src, dst = pairs[:, 0].long(), pairs[:, 1].long()
    kv[:, dst] = kv[:, src]


class KVCache:
    """K/V tensors of all layers in ``num_blocks`` blocks of ``block_size`` tokens.

    ``kv`` has shape [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim];
    ``kv[layer]`` is flashinfer's NHD paged cache for that layer
    ([num_pages, 2, page_size, num_kv_heads, head_dim], K at index 0, V at 1).
    ``manager`` decides which blocks a sequence owns; a slot index ``s`` names
    token position ``s % block_size`` of block ``s // block_size``::

        block_table [5, 2]    block 5           block 2
        block_size 4          slots 20..23      slots 8..11
        tokens 0..5     ->    t0 t1 t2 t3       t4 t5 -- --
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.manager = _C.BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv = torch.zeros(
            (num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, K and V."""
        return self.kv[:, 0].numel() * self.kv.element_size()

    def write(self, layer: int, slot_mapping, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' keys and values.

        slot_mapping: int [num_tokens] (as ``manager.append`` returns it);
        k, v: [num_tokens, num_kv_heads, head_dim].
        """
        slots = torch.as_tensor(slot_mapping, device=self.device).long()
        expected = (slots.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k and v must be {list(expected)}, got {list(k.shape)} and {list(v.shape)}")
        write_kv(self.kv[layer], slots, k, v)

    def read(self, layer: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token of one sequence, each [num_tokens, num_kv_heads, head_dim]."""
        table = torch.from_numpy(self.manager.block_table(seq_id)).to(self.device).long()
        num_tokens = self.manager.num_tokens(seq_id)
        pages = self.kv[layer, table].transpose(0, 1)  # [2, num_pages, block_size, H, D]
        kv = pages.reshape(2, -1, self.num_kv_heads, self.head_dim)[:, :num_tokens]
        return kv[0], kv[1]

    def copy_blocks(self, pairs) -> None:
        """Apply the (src, dst) copy-on-write copies of one ``manager.append`` call to every layer.

        pairs: int [num_copies, 2]. No block may be both a src and a dst, and no
        dst may repeat: copies from one append never are; copies gathered from
        several appends must be applied call by call.
        """
        pairs = np.asarray(pairs)
        if pairs.size == 0:
            return
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
            raise ValueError(f"pairs must be integers of shape [num_copies, 2], got {pairs.dtype} {pairs.shape}")
        num_blocks = self.kv.shape[1]
        if pairs.min() < 0 or pairs.max() >= num_blocks:
            raise ValueError(f"pairs hold block ids outside [0, {num_blocks})")
        src, dst = pairs[:, 0], pairs[:, 1]
        if len(np.unique(dst)) != len(dst) or np.isin(dst, src).any():
            raise ValueError("pairs repeat a dst block or use a block as both src and dst")
        pairs_t = torch.from_numpy(np.ascontiguousarray(pairs, dtype=np.int32)).to(self.device, non_blocking=True)
        impl = _native.block_copy_impl(self.device)
        if impl == "cuda_ext":
            _native._C_cuda.copy_blocks(
                kv=self.kv.data_ptr(),
                pairs=pairs_t.data_ptr(),
                num_pairs=pairs_t.shape[0],
                num_layers=self.kv.shape[0],
                layer_stride_bytes=self.kv.stride(0) * self.kv.element_size(),
                block_bytes=self.bytes_per_block // self.kv.shape[0],
                stream=torch.cuda.current_stream(self.device).cuda_stream,
            )
        elif impl == "triton":
            from pf_engine.kernels.copy_blocks import copy_blocks

            copy_blocks(self.kv, pairs_t)
        else:
            copy_blocks_reference(self.kv, pairs_t)
