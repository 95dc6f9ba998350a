"""Llama-family decoder (Llama, Mistral without sliding window, SmolLM2) over the paged KV cache.

Module and parameter names follow Hugging Face checkpoints, so weights load by name.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pf_engine.attention import AttentionMetadata
from pf_engine.models.linear import Linear, PackedGroup

# Rope types whose frequencies change with the sequence length at run time.
_DYNAMIC_ROPE = ("dynamic", "longrope")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary:
    """cos/sin of the config's rope type, as transformers computes them.

    A plain object, not a module: its frequencies are derived from the config,
    never loaded, and survive building the model on the meta device. With a
    ``partial_rotary_factor`` (Phi-3) only the first part of each head rotates.
    """

    def __init__(self, config):
        params = config.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type in _DYNAMIC_ROPE:
            raise ValueError(f"rope type {rope_type!r} depends on the sequence length at run time and is not supported")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope type {rope_type!r}")
        with torch.device("cpu"):  # also when the model is being built on the meta device
            if rope_type == "default":
                dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
                inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
                scaling = 1.0
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu")
        self.inv_freq = inv_freq.float().cpu()
        self.scaling = scaling

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, rotary_dim <= head_dim]: the first
    rotary_dim features of each head rotate, the rest pass through."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Separate q/k/v projections; families change :meth:`project` (fused weights, per-head norms)."""

    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)

    qkv: PackedGroup | None = None

    def group_packed(self) -> None:
        self.qkv = PackedGroup.of([self.q_proj, self.k_proj, self.v_proj])

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, head_dim], k and v [n, kv_heads, head_dim], before the rotation."""
        n = x.shape[0]
        if self.qkv is not None and self.qkv.runs(x):
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim),
                v.view(n, self.num_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, plan, kv_layer):
        q, k, v = self.project(x)
        out = plan.attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, kv_layer)
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    gate_up: PackedGroup | None = None

    def group_packed(self) -> None:
        self.gate_up = PackedGroup.of([self.gate_proj, self.up_proj])

    def forward(self, x):
        gate, up = self.gate_up(x) if self.gate_up is not None and self.gate_up.runs(x) else (self.gate_proj(x),
                                                                                              self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, family):
        super().__init__()
        self.self_attn = family.attention_class(config, *family.attention_biases(config))
        self.mlp = family.mlp_class(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = family.residual_multiplier(config)

    def forward(self, x, cos, sin, plan, kv_layer):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, plan, kv_layer)
        x = x + (attn if self.residual_multiplier == 1.0 else attn * self.residual_multiplier)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (mlp if self.residual_multiplier == 1.0 else mlp * self.residual_multiplier)


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm: token ids in, hidden states out.

    ``family`` (a causal-LM class below or in a sibling module) names the attention and MLP
    classes and the scalars its checkpoints' math adds to Llama's.
    """

    def __init__(self, config, family):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, family) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.attention_scale = family.attention_scale(config)
        self.embedding_multiplier = family.embedding_multiplier(config)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, backend, kv: torch.Tensor) -> torch.Tensor:
        """input_ids: int64 [num_tokens]; kv: [num_layers, num_blocks, 2, block_size, Hkv, D]."""
        x = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        cos, sin = self.rotary(meta.positions, x.dtype)
        plan = backend.plan(meta, self.attention_scale, self.num_heads, self.num_kv_heads, self.head_dim, x.dtype)
        for layer, kv_layer in zip(self.layers, kv, strict=True):
            x = layer(x, cos, sin, plan, kv_layer)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama's decoder and LM head. A family of the same shape subclasses it and overrides the
    parts below: its attention and MLP classes and its scalars (all 1 or the usual here)."""

    attention_class = Attention
    mlp_class = MLP

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, type(self))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        """(q/k/v projections, output projection) carry a bias."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    @staticmethod
    def attention_scale(config) -> float:
        return head_dim(config) ** -0.5

    @staticmethod
    def embedding_multiplier(config) -> float:
        return 1.0

    @staticmethod
    def residual_multiplier(config) -> float:
        return 1.0

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, meta, backend, kv) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of the new tokens."""
        return self.model(input_ids, meta, backend, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def token_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a few tokens only (token-pair PRMs): [num_tokens, len(token_ids)]."""
        return hidden @ self.lm_head.weight[token_ids].T
