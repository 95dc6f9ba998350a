"""What an attention backend does, written once: plan a batch, then attend it layer by layer.

A backend (``torch``, ``triton``, ``flashinfer``) is built once per runner and holds no batch.
Each forward asks it for a plan of that batch; every decoder layer then calls the plan's
``attend`` with its own queries and its own layer of the KV cache::

    plan = backend.plan(meta, scale, num_q_heads, num_kv_heads, head_dim, dtype)   # once a forward
    for layer, kv_layer in zip(layers, kv):
        out = plan.attend(q, k, v, kv_layer)                                        # once a layer

NOTE: a plan belongs to one batch (its ``meta``). Attend with it on every layer before asking for
the next plan: flashinfer's wrappers hold one plan at a time, so an older plan may not run after
a newer one is made. Every layer a plan attends must have a cache of the same dtype.
"""

from typing import Protocol, runtime_checkable

import torch

from pf_engine.attention.metadata import AttentionMetadata


@runtime_checkable
class AttentionPlan(Protocol):
    """One batch's attention, prepared once and shared by every layer."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        """Write the new tokens' keys and values into ``kv_layer`` and attend each query causally.

        Query row ``t`` (a token of sequence ``i``, at position ``meta.positions[t]``) sees every
        key of sequence ``i`` up to and including its own position: the cached ones and the new.

        Parameters
        ----------
        q : Tensor [num_tokens, num_q_heads, head_dim]
            The new tokens' queries, rotary applied, sequence after sequence as in ``meta``.
        k, v : Tensor [num_tokens, num_kv_heads, head_dim]
            Their keys (rotary applied) and values, stored at ``meta.slot_mapping``.
        kv_layer : Tensor [num_blocks, 2, block_size, num_kv_heads, head_dim]
            This layer's paged cache (keys at index 0, values at 1); written in place.

        Returns
        -------
        Tensor [num_tokens, num_q_heads, head_dim], in ``q``'s dtype.
        """
        ...


@runtime_checkable
class AttentionBackend(Protocol):
    """Attention over the paged KV cache. ``name`` is what ``get_backend`` knows it by."""

    name: str

    def plan(self, meta: AttentionMetadata, scale: float, num_q_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> AttentionPlan:
        """The plan of one batch, for every layer of a model with these heads.

        Parameters
        ----------
        meta : AttentionMetadata
            The batch: ``num_seqs`` sequences, ``num_tokens`` new tokens in all.
        scale : float
            Softmax scale of the scores (``head_dim ** -0.5`` for most models).
        num_q_heads, num_kv_heads, head_dim : int
            The model's query heads, key/value heads (``num_q_heads`` a multiple) and head width.
        dtype : torch.dtype
            The queries' dtype; the cache's own is read from each ``kv_layer``.

        Returns
        -------
        AttentionPlan
        """
        ...
