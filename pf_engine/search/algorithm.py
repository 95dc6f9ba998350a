"""What a search algorithm decides for a problem after each of its rounds: one small
object per algorithm and config, shared by every problem of a call (per-problem state
lives on the Problem, in ``problem.extra``)."""

import numpy as np
import torch

from pf_engine.answers import extract_answer
from pf_engine.core import Core
from pf_engine.resample import ResampleOutput, ResampleParams
from pf_engine.search.config import SearchConfig
from pf_engine.state import Problem, Round
from pf_engine.votes import settled


class Algorithm:
    """The default: score every step, keep every particle (no selection).

    NOTE: ``config.seed`` is not read here: each problem draws with its own ``rules.seed``, so
    problems of differing seeds share an algorithm object and end their rounds together.
    """

    scores = True  # the PRM scores every step (and the fused step weighs it)
    votes = False  # the answer is the weighted vote, whatever config.final_answer says
    outcome_ranks = False  # with no PRM but an outcome model, the outcome model ranks the particles
    stops_early = False  # config.early_stop may end the search once the finished particles' answers agree (StopsEarly)

    def __init__(self, config: SearchConfig):
        self.config = config

    @classmethod
    def check(cls, config: SearchConfig) -> None:
        """ValueError where ``config`` does not suit the algorithm (SearchConfig calls it)."""

    @classmethod
    def scheme(cls, config: SearchConfig) -> str:
        """The resampling scheme the fused step uses."""
        return config.scheme

    def prepare_round(self, problem: Problem) -> None:
        """Before a round: set ``problem.forced`` for slots that replay given tokens."""

    def weigh(self, engine: Core, batch: Round, params: ResampleParams,
              uniforms: torch.Tensor) -> tuple[ResampleOutput, torch.Tensor | None]:
        """Weigh a scored round: the fused step's output, and each problem's weight temperature
        where the algorithm sets one (None: the config's alone)."""
        return engine.weigh(batch, params, uniforms), None

    def select(self, engine: Core, batch: Round, out: ResampleOutput) -> list[np.ndarray | None]:
        """After a scored round (its problems weighed together in ``out``): each problem's next
        generation as local ancestors (slot j copies slot ancestors[j]), or None to keep the
        particles and carry their weights. Problems ending their sweep (``batch.done``) keep theirs."""
        return [None] * len(batch.problems)

    def settles(self, engine: Core, problem: Problem) -> bool:
        """Whether the search may end now, the particles still writing cancelled where they stand
        (asked whenever a particle finishes, also inside a step, and at each round's end)."""
        return False

    def end_sweep(self, engine: Core, problem: Problem) -> bool:
        """At the end of a sweep: whether the problem runs another (particle Gibbs)."""
        return False


def local(out: ResampleOutput, b: int, n: int) -> np.ndarray:
    """Problem b's ancestors from a fused step over problems of n particles, as slots."""
    return out.ancestors[b * n:(b + 1) * n].cpu().numpy().astype(np.int64) - b * n


class StopsEarly:
    """For searches whose particles never meet (self-consistency, best-of-N): ``config.early_stop``
    ends the search once the answers of the particles finished so far agree (pf_engine.votes)."""

    stops_early = True

    def settles(self, engine: Core, problem: Problem) -> bool:
        cfg = self.config
        if cfg.early_stop == "none":
            return False
        finished = engine.table.finished[problem.rows]
        known = problem.extra.setdefault("answers", {})  # committed leaf -> answer: those never change
        answers = [None] * problem.num_particles
        for slot in np.flatnonzero(finished).tolist():
            if problem.finished[slot]:
                leaf = int(problem.leaf[slot])
                if leaf not in known:
                    known[leaf] = extract_answer("".join(problem.steps(slot)))
                answers[slot] = known[leaf]
            else:  # it finished in the step in flight
                answers[slot] = extract_answer(engine.writer.text_so_far(problem, slot))
        return settled(cfg.early_stop, cfg.stop_threshold, answers, finished.tolist())
