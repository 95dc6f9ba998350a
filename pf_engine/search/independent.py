"""Independent samples: best-of-N (the PRM's running score of each ranks them) and
self-consistency (no PRM; a majority vote picks the answer)."""

from pf_engine.search.policy import SelectionPolicy


class BestOfN(SelectionPolicy):
    """Every step scored, no particle ever replaced."""


class SelfConsistency(SelectionPolicy):
    """No PRM: every particle weighs the same."""

    scores = False
