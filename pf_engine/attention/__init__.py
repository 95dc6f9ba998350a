"""Attention over the paged KV cache, behind one interface.

A backend writes the new tokens' keys and values into the cache at
``meta.slot_mapping`` and attends each new query causally to every token of
its sequence. Backends: ``torch`` (reference, any device), ``triton`` (paged
decode kernel; prefill through the torch path), ``flashinfer`` (CUDA only).
"""

from pf_engine.attention.metadata import AttentionMetadata, build_metadata
from pf_engine.attention.torch_backend import TorchBackend


def get_backend(name: str, device):
    """The backend called ``name`` ("auto": flashinfer on CUDA where it imports, else torch)."""
    import torch

    from pf_engine import _native

    device = torch.device(device)
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" and _native.HAS_FLASHINFER else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        from pf_engine.attention.triton_backend import TritonBackend

        if not _native.HAS_TRITON or not (device.type == "cuda" or _native.TRITON_INTERPRET):
            raise ValueError("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on the CPU")
        return TritonBackend()
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer backend needs a CUDA device")
        if not _native.HAS_FLASHINFER:
            raise ValueError(f"the flashinfer backend needs flashinfer: {_native.flashinfer_import_error()}")
        from pf_engine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(device)
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch, triton or flashinfer")


__all__ = ["AttentionMetadata", "build_metadata", "get_backend"]
