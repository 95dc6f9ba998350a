"""Batched forwards of one model over its own paged KV cache (prefill and decode in one batch)."""

import numpy as np
import torch

from pf_engine.attention import build_metadata, get_backend
from pf_engine.kv_cache import KVCache
from pf_engine.models.linear import pack_linears
from pf_engine.models.llama import head_dim


class ModelRunner:
    """A model, its KV cache and an attention backend.

    Sequences are created, forked, resampled and freed on ``manager`` (the
    cache's BlockManager); ``forward`` appends tokens to them and runs the model.
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, backend: str = "auto",
                 kv_dtype: torch.dtype | None = None):
        config = model.config
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.vocab_size = config.vocab_size
        self.kv_cache = KVCache(
            config.num_hidden_layers, config.num_key_value_heads, head_dim(config), num_blocks, block_size,
            dtype=kv_dtype or param.dtype, device=self.device,
        )
        self.backend = get_backend(backend, self.device)
        self.linear_impl = pack_linears(model)

    @property
    def manager(self):
        return self.kv_cache.manager

    def forward(self, seq_ids, new_tokens) -> torch.Tensor:
        """Append ``new_tokens[i]`` (a list of token ids) to sequence ``seq_ids[i]`` and run the model.

        Returns the hidden states of the new tokens, sequence after sequence:
        [sum(len(t) for t in new_tokens), hidden_size]. See :meth:`run`.
        """
        counts = np.array([len(t) for t in new_tokens], dtype=np.int64)
        flat = np.fromiter((t for tokens in new_tokens for t in tokens), dtype=np.int64, count=int(counts.sum()))
        return self.run(seq_ids, counts, flat)

    def run(self, seq_ids, counts: np.ndarray, flat: np.ndarray) -> torch.Tensor:
        """:meth:`forward` on arrays: ``counts[i]`` new tokens for ``seq_ids[i]``, all in ``flat``.

        Raises OutOfBlocksError (nothing changed) when the cache is too small,
        ValueError for a token id outside the vocabulary; if the forward itself
        fails, the sequences are truncated back to their lengths before the call
        and the error re-raised.
        """
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = flat[(flat < 0) | (flat >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        slots, copies = self.manager.append(seq_ids, counts)
        try:
            self.kv_cache.copy_blocks(copies)
            meta = build_metadata(self.manager, seq_ids, counts, slots, self.device)
            input_ids = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64)).to(self.device)
            with torch.inference_mode():
                return self.model(input_ids, meta, self.backend, self.kv_cache.kv)
        except BaseException:
            # The sequences get their lengths back, so a retry (or the caller's clean-up) sees
            # them as they were; slots the failed forward half-wrote lie past their ends.
            before = [self.manager.num_tokens(int(s)) - int(n) for s, n in zip(seq_ids, counts, strict=True)]
            self.manager.truncate(seq_ids, before)
            raise

    @staticmethod
    def last_token_index(new_tokens) -> torch.Tensor:
        """Row of each sequence's last new token in ``forward``'s output."""
        return torch.from_numpy(np.cumsum([len(t) for t in new_tokens]) - 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [num_rows, vocab] in float32."""
        with torch.inference_mode():
            return self.model.compute_logits(hidden).float()
