"""Weights from the policy itself: how confident the policy was in each step, from the logits its
sampler already holds (no extra forward), and how that confidence joins a PRM's reward.

Per drawn token the writer keeps one fp32 value of the policy's own distribution ``p``
(its logits at temperature 1, before any sampling filter) over the vocabulary of ``V``::

    mean_logprob    log p(token)
    self_certainty  KL(U || p) = -log V - mean_j log p_j     (Kang et al. 2025)
    tail_entropy    H(p) = -sum_j p_j log p_j                 (iPF, arXiv 2606.08850)

At the end of a round each step's values become the log-odds ``lam`` of a confidence
``s = sigmoid(lam)`` in (0, 1):

    mean_logprob    s = exp(mean log p(token)), the geometric-mean probability of the step's tokens
    tail_entropy    s = exp(-mean H) over the step's last ``tail_tokens`` tokens
    self_certainty  lam = mean KL(U || p) - log V, so that the weights are exp(self-certainty)

(its_hub's "logit" style for the first two). The fused step reads the step reward
``sigmoid(logit(r_prm) + exponent * lam)``, or ``sigmoid(exponent * lam)`` without a PRM: with
aggregation "last" a particle's weight is its PRM weight times its confidence's weight to the
power ``exponent`` (``softmax((logit(r_prm) + exponent * lam) / weight_temperature)``). A step of
no tokens has ``lam = 0``; ``lam`` is held in [-30, 30] (the fused step clips far inside that).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from pf_engine.resample import ResampleParams, raise_on_invalid

SIGNALS = ("self_certainty", "mean_logprob", "tail_entropy")
WEIGHTS = ("prm", *SIGNALS, *(f"prm*{signal}" for signal in SIGNALS))  # SearchConfig.weights
LOG_ODDS_BOUND = 30.0


@dataclass(frozen=True, slots=True)
class Weighting:
    """What a step's reward is made of: the PRM's (``prm``), the policy's confidence (``signal``,
    one of SIGNALS, or None) raised to ``exponent``, or both multiplied."""

    prm: bool = True
    signal: str | None = None
    exponent: float = 1.0

    @classmethod
    def parse(cls, weights: str, exponent: float = 1.0) -> "Weighting":
        """``"prm"``, a signal's name, or ``"prm*" + name``; ValueError naming the choices otherwise."""
        if not (exponent > 0 and math.isfinite(exponent)):
            raise ValueError(f"signal_exponent must be a positive finite number, got {exponent}")
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        return cls(weights.startswith("prm"), None if weights == "prm" else weights.rpartition("*")[2], exponent)


def token_values(logits: torch.Tensor, tokens: torch.Tensor, signal: str) -> torch.Tensor:
    """float32 [rows]: each row's value of ``signal`` (the module docstring) for its drawn ``tokens``,
    from the model's logits [rows, V] (any dtype; computed in float32)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    if signal == "mean_logprob":
        return z.gather(1, tokens.to(z.device)[:, None]).squeeze(1) - lse
    if signal == "self_certainty":
        return lse - z.mean(dim=-1) - math.log(z.shape[-1])
    return lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def step_log_odds(values: np.ndarray, lengths: np.ndarray, signal: str, tail_tokens: int,
                  vocab_size: int) -> np.ndarray:
    """float64 [rows]: each step's confidence as log-odds ``lam`` from its tokens' fp32 ``values``
    [rows, width] (the first ``lengths[row]`` of each row are the step's)."""
    positions = np.arange(values.shape[1])
    first = np.maximum(lengths - tail_tokens, 0) if signal == "tail_entropy" else np.zeros_like(lengths)
    mask = (positions >= first[:, None]) & (positions < lengths[:, None])
    count = mask.sum(axis=1)
    mean = np.where(mask, values, 0.0).sum(axis=1, dtype=np.float64) / np.maximum(count, 1)
    if signal == "self_certainty":
        lam = mean - math.log(vocab_size)
    else:  # the log-odds of exp(c), c <= 0
        c = np.minimum(mean if signal == "mean_logprob" else -mean, 0.0)
        with np.errstate(divide="ignore"):
            lam = c - np.log(-np.expm1(c))
    return np.where(count > 0, np.clip(lam, -LOG_ODDS_BOUND, LOG_ODDS_BOUND), 0.0)


def combined_rewards(prm_output: torch.Tensor | None, reward_kind: str | None, log_odds: torch.Tensor,
                     exponent: float, live: torch.Tensor, num_particles: int) -> torch.Tensor:
    """float32 step rewards ``sigmoid(logit(r_prm) + exponent * lam)`` (without a PRM output,
    ``sigmoid(exponent * lam)``), from a PRM's output of ``reward_kind`` and float64 ``log_odds``,
    one per particle of problems of ``num_particles``. ValueError, as the fused step words it, where
    a ``live`` particle's PRM output is unusable (NaN, a reward outside [0, 1], infinite logits)."""
    total = exponent * log_odds
    if prm_output is not None:
        x = prm_output.double()
        if reward_kind == "reward":
            prm_logit = torch.where((x >= 0) & (x <= 1), torch.logit(x), torch.nan)
            bad = torch.isnan(prm_logit)
        else:
            prm_logit = x[:, 1] - x[:, 0] if reward_kind == "class_logits" else x[:, 0] - x[:, 1]
            bad = ~torch.isfinite(prm_logit)
        bad &= live
        if bool(bad.any()):
            raise_on_invalid(bad.view(-1, num_particles).any(dim=1), prm_output, live, ResampleParams(reward_kind))
        total = total + torch.where(live, prm_logit, 0.0)
    return torch.sigmoid(total).float()


def trace_confidences(values: list[np.ndarray], signal: str, tail_tokens: int, vocab_size: int,
                      exponent: float) -> np.ndarray:
    """float64 [traces]: each whole answer's confidence ``sigmoid(lam) ** exponent``, from its tokens' fp32
    ``values`` (one array per trace, all its steps' tokens in order) as for a step of all of them."""
    width = max((len(v) for v in values), default=0)
    table = np.zeros((len(values), max(width, 1)), dtype=np.float32)
    for i, v in enumerate(values):
        table[i, :len(v)] = v
    lam = step_log_odds(table, np.array([len(v) for v in values]), signal, tail_tokens, vocab_size)
    return (1 / (1 + np.exp(-lam))) ** exponent
