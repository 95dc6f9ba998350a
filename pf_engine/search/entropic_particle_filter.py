"""Entropic particle filtering (ePF, arXiv 2510.05825): particle filtering whose weights are
annealed while the particles collapse early.

After each round the weights are first formed as particle filtering forms them,
``w = softmax(logit(score) / weight_temperature)``. Where that problem's effective
sample size is below ``annealing_threshold * N`` and the round lies in the first
``annealing_phase`` of ``max_steps`` (progress ``t / max_steps``, t the rounds done),
they are formed again at a temperature ``T >= 1``, ``softmax(logit(score) /
(weight_temperature * T))``, and resampling draws from those. ``T`` by ``annealing``:

    ess      (N / ESS) * (1 - progress)
    entropy  1 / (H + (1 - H) * progress), H the weights' entropy over log N (N > 2)
    base     annealing_max_temperature - progress

each floored at 1. The temperature a round used is in the tree (``TreeNode.temperature``).
With ``annealing_threshold`` 0 no round anneals and this is particle filtering.
"""

import math

import torch

from pf_engine.search.particle_filter import ParticleFilter

SCHEDULES = ("ess", "entropy", "base")


def annealing_temperatures(weights: torch.Tensor, ess: torch.Tensor, progress: torch.Tensor, schedule: str,
                           threshold: float, phase: float, max_temperature: float) -> torch.Tensor:
    """float32 [num_problems]: each problem's annealing temperature from its weights
    [num_problems, N] and ESS [num_problems] at the base temperature, and its progress t / T."""
    n = weights.shape[1]
    w = weights.double()
    if schedule == "ess":
        value = n / ess.double() * (1 - progress)
    elif schedule == "entropy":
        entropy = -torch.special.xlogy(w, w).sum(dim=1)
        if n > 2:
            entropy = entropy / math.log(n)
        value = 1 / (entropy + (1 - entropy) * progress)
    else:
        value = max_temperature - progress
    anneal = (ess.double() < threshold * n) & (progress < phase)
    return torch.where(anneal, value.clamp(min=1.0), 1.0).float()


class EntropicParticleFilter(ParticleFilter):
    @classmethod
    def check(cls, config):
        if config.annealing not in SCHEDULES:
            raise ValueError(f"unknown annealing {config.annealing!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("annealing_threshold", "annealing_phase"):
            if not 0 <= getattr(config, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
        if not 1 <= config.annealing_max_temperature < math.inf:
            raise ValueError(f"annealing_max_temperature must be a finite number >= 1, "
                             f"got {config.annealing_max_temperature}")

    def weigh(self, engine, batch, params, uniforms):
        cfg, n = self.config, self.config.num_particles
        out = engine.weigh(batch, params, uniforms)
        progress = torch.tensor([(p.step + 1) / cfg.max_steps for p in batch.problems], dtype=torch.float64)
        temperatures = annealing_temperatures(
            out.weights.cpu().view(-1, n), out.ess.cpu(), progress, cfg.annealing, cfg.annealing_threshold,
            cfg.annealing_phase, cfg.annealing_max_temperature)
        if bool((temperatures > 1).any()):
            out = engine.weigh(batch, params, uniforms, temperatures=temperatures)
        return out, temperatures
