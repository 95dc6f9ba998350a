"""What a search algorithm decides for a problem after each of its rounds: one small
policy object per algorithm, shared by every problem of a call (per-problem state
lives on the Problem)."""

import numpy as np

from pf_engine.engine import ParticleEngine
from pf_engine.resample import ResampleOutput
from pf_engine.search.config import SearchConfig
from pf_engine.state import Problem, Round


class SelectionPolicy:
    """The default: score every step, keep every particle (no selection).

    NOTE: ``config.seed`` is not read here: each problem draws with its own ``rules.seed``, so
    problems of differing seeds share a policy object and end their rounds together.
    """

    scores = True  # the PRM scores every step (and the fused step weighs it)

    def __init__(self, config: SearchConfig):
        self.config = config

    def prepare_round(self, problem: Problem) -> None:
        """Before a round: set ``problem.forced`` for slots that replay given tokens."""

    def select(self, engine: ParticleEngine, batch: Round, out: ResampleOutput) -> list[np.ndarray | None]:
        """After a scored round (its problems weighed together in ``out``): each problem's next
        generation as local ancestors (slot j copies slot ancestors[j]), or None to keep the
        particles and carry their weights. Problems ending their sweep (``batch.done``) keep theirs."""
        return [None] * len(batch.problems)

    def end_sweep(self, engine: ParticleEngine, problem: Problem) -> bool:
        """At the end of a sweep: whether the problem runs another (particle Gibbs)."""
        return False


def local(out: ResampleOutput, b: int, n: int) -> np.ndarray:
    """Problem b's ancestors from a fused step over problems of n particles, as slots."""
    return out.ancestors[b * n:(b + 1) * n].cpu().numpy().astype(np.int64) - b * n
