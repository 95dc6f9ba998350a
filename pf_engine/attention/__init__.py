"""Attention over the paged KV cache, behind one interface.

A backend writes the new tokens' keys and values into the cache at
``meta.slot_mapping`` and attends each new query causally to every token of
its sequence (the protocol: ``backend.py``). Backends, by name in ``registry.py``:
``torch`` (reference, any device), ``triton`` (paged decode kernel; prefill
through the torch path), ``flashinfer`` (CUDA only).
"""

from pf_engine.attention.backend import AttentionBackend, AttentionPlan
from pf_engine.attention.metadata import AttentionMetadata, build_metadata
from pf_engine.attention.registry import backend_names, get_backend, register_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionPlan", "backend_names", "build_metadata",
           "get_backend", "register_backend"]
