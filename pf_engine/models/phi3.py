"""Phi-3 and Phi-4 policies: Llama with fused q/k/v and gate/up weights (``qkv_proj``,
``gate_up_proj``, as their checkpoints store them) and partial rotary where the config sets
``partial_rotary_factor`` (handled by the shared Rotary)."""

import torch
from torch import nn
from transformers.activations import ACT2FN

from pf_engine.models.linear import Linear
from pf_engine.models.llama import Attention, LlamaForCausalLM, head_dim


class Phi3Attention(Attention):
    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        nn.Module.__init__(self)  # one fused projection in place of Attention's three
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = Linear(config.hidden_size, sum(self.sizes), bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)

    def group_packed(self) -> None:  # the checkpoint's q/k/v are one weight already
        pass

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        return (q.reshape(n, self.num_heads, self.head_dim), k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim))


class Phi3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3ForCausalLM(LlamaForCausalLM):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        return False, False
