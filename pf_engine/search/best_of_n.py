"""Best-of-N: N independent samples, every step scored; the PRM's running score of each
ranks them, and no particle is ever replaced."""

from pf_engine.search.policy import SelectionPolicy


class BestOfN(SelectionPolicy):
    pass
