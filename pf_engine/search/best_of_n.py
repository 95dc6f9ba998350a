"""Best-of-N: N independent samples, every step scored; the PRM's running score of each
ranks them, and no particle is ever replaced."""

from pf_engine.search.algorithm import Algorithm, StopsEarly


class BestOfN(StopsEarly, Algorithm):
    outcome_ranks = True
