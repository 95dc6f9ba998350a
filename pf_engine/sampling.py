"""Token sampling: temperature, top-k, top-p, from a seeded generator."""

from dataclasses import dataclass

import torch

from pf_engine._native import _C


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 is off), got {self.top_k!r}")


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 logits of the sampling distribution: temperature applied, tokens cut by top-k/top-p at -inf.

    ``softmax`` of these is what :func:`sample` draws from (temperature > 0).
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row. logits: [num_seqs, vocab]; returns int64 [num_seqs].

    With ``uniforms`` (float [num_seqs] in [0, 1)) a row takes the token where
    its uniform falls in the cumulative distribution (inverse CDF), so a draw
    depends on its own uniform only, not on the batch around it; otherwise
    tokens come from ``torch.multinomial`` with ``generator``.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, params).softmax(dim=-1)
    if uniforms is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return inverse_cdf(probs, uniforms.to(probs.device, torch.float32))


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row r's first token whose float64 running sum of ``probs`` exceeds ``uniforms[r]`` times the row's total.

    probs: float32 [num_rows, vocab]; uniforms: float32 [num_rows]; returns int64 [num_rows],
    at most vocab - 1. On the CPU one native pass (csrc/sampling.cpp) gives exactly what
    :func:`inverse_cdf_reference` gives, without the float64 copy and running sums of every row.
    """
    if probs.device.type != "cpu":
        return inverse_cdf_reference(probs, uniforms)
    probs, uniforms = probs.contiguous(), uniforms.contiguous()
    out = torch.empty(probs.shape[0], dtype=torch.int64)
    _C.inverse_cdf_sample(probs=probs.data_ptr(), uniforms=uniforms.data_ptr(), num_rows=probs.shape[0],
                          vocab=probs.shape[1], out=out.data_ptr(), num_threads=torch.get_num_threads())
    return out


def inverse_cdf_reference(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """:func:`inverse_cdf` in torch: float64 running sums, searched with ``right=True``."""
    cdf = probs.double().cumsum(dim=-1)
    points = uniforms.to(torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, points, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
