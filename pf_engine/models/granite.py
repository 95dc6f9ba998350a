"""Granite 3.x dense policies: Llama with four scalars from the config (embedding, residual and
attention multipliers, and a divisor of the logits)."""

import torch

from pf_engine.models.llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_scale(config) -> float:
        return config.attention_multiplier  # in place of head_dim ** -0.5

    @staticmethod
    def embedding_multiplier(config) -> float:
        return config.embedding_multiplier

    @staticmethod
    def residual_multiplier(config) -> float:
        return config.residual_multiplier

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.config.logits_scaling

    def token_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return super().token_logits(hidden, token_ids) / self.config.logits_scaling
