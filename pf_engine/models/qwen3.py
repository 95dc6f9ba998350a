"""Qwen3 dense policies: Llama with an RMSNorm over each query and key head before the rotation,
and an explicit ``head_dim`` (which need not be hidden_size / heads)."""

import torch

from pf_engine.models.llama import Attention, LlamaForCausalLM, RMSNorm


class Qwen3Attention(Attention):
    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        super().__init__(config, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
