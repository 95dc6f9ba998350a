"""Votes over particles' final answers, and the rules that stop drawing once a vote has settled.

Stopping rules (``SearchConfig.early_stop``, for self-consistency and best-of-N), checked whenever a
particle of the problem finishes (also inside a step) and at each round's end, over the answers of
the particles finished by then; once one holds, the problem's other particles are cancelled where
they stand and its blocks freed at once:

    adaptive   doubling: once the first m slots (m = 2, 4, 8, ... < N) have all finished and the
               most common answer among them holds at least ``threshold`` of the m (default 0.75;
               a particle without an answer agrees with none), as its_hub's
               AdaptiveSelfConsistency decides after each doubled batch
    beta       with v1 and v2 the counts of the two most common answers among the finished
               particles, P(x > 1/2) for x ~ Beta(v1 + 1, v2 + 1) (a uniform prior on the leading
               answer's share of the two) at least ``threshold`` (default 0.95), as its_hub's
               BetaSelfConsistency (Aggarwal et al. 2023)

The vote (``SearchConfig.vote``, self-consistency) over the finished particles (all of them,
without early stopping): ``majority``; ``weighted``, each particle's vote weighing its confidence
over its whole answer (pf_engine.confidence's signal of ``weights``, raised to
``signal_exponent``: DeepConf-style); ``confidence_selection``, the single most confident answer.
"""

import math

import numpy as np

from pf_engine.answers import answer_classes

VOTES = ("majority", "weighted", "confidence_selection")
CONFIDENCE_VOTES = VOTES[1:]  # those that weigh each answer by the policy's confidence in it
EARLY_STOPS = ("none", "adaptive", "beta")
DEFAULT_THRESHOLDS = {"adaptive": 0.75, "beta": 0.95}


def beta_confidence(v1: int, v2: int) -> float:
    """P(x > 1/2) for x ~ Beta(v1 + 1, v2 + 1): for integer parameters, P(Binomial(v1 + v2 + 1, 1/2) <= v1)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, k) for k in range(v1 + 1)) / 2**n


def settled(rule: str, threshold: float, answers: list[str | None], finished: list[bool]) -> bool:
    """Whether the vote over ``answers`` (one per slot; only ``finished`` slots' are read) has settled
    by ``rule`` before every particle finished."""
    n = len(answers)
    if all(finished):
        return False  # the search is over anyway
    if rule == "adaptive":
        m = 2
        while m < n and all(finished[:m]):
            counts = [len(members) for _, _, members in answer_classes(answers[:m], [1.0] * m)]
            if counts and max(counts) >= threshold * m:
                return True
            m *= 2
        return False
    done = [a if f else None for a, f in zip(answers, finished, strict=True)]
    counts = sorted((len(members) for _, _, members in answer_classes(done, [1.0] * n)), reverse=True)
    if sum(counts) < 2:  # two answers at least, as its_hub
        return False
    return beta_confidence(counts[0], counts[1] if len(counts) > 1 else 0) >= threshold


def vote(kind: str, answers: list[str | None], weights: list[float]) -> tuple[str | None, int]:
    """The answer and the particle that gives it, from the particles' ``answers`` (None: no answer, or
    not in the vote) and ``weights``: for majority and weighted the class of most weight (the first on a
    tie), given by its first member (majority) or its heaviest (weighted); for confidence_selection the
    heaviest particle with an answer. Without any answer: None and the heaviest particle."""
    heaviest = int(np.argmax(weights))
    classes = answer_classes(answers, weights)
    if not classes:
        return None, heaviest
    if kind == "confidence_selection":
        chosen = max((i for i, a in enumerate(answers) if a is not None), key=lambda i: (weights[i], -i))
        return answers[chosen], chosen
    answer, _, members = max(classes, key=lambda c: c[1])
    return answer, members[0] if kind == "majority" else max(members, key=lambda i: (weights[i], -i))
