"""Search algorithms, each a small selection policy over the same engine loop, so
comparisons are fair:

- particle_filter: score every step, resample every step (Puri et al. 2025)
- particle_gibbs: sweeps of particle filtering, each conditioned on a reference path
  drawn from the previous sweep (conditional SMC), optionally with ancestor sampling
- best_of_n: N independent samples; the PRM's running score of each ranks them
- beam_search: keep the N / beam_width best by PRM score, extend each beam_width ways
- dvts: N / beam_width independent subtrees, each keeping its best and extending it beam_width ways
- self_consistency: N independent samples, no PRM; majority vote
"""

from pf_engine.search.beam_search import BeamSearch, top_ancestors
from pf_engine.search.best_of_n import BestOfN
from pf_engine.search.config import ALGORITHMS, SearchConfig
from pf_engine.search.dvts import DVTS
from pf_engine.search.particle_filter import ParticleFilter
from pf_engine.search.particle_gibbs import ParticleGibbs
from pf_engine.search.policy import SelectionPolicy
from pf_engine.search.self_consistency import SelfConsistency

POLICIES = {"particle_filter": ParticleFilter, "particle_gibbs": ParticleGibbs, "best_of_n": BestOfN,
            "beam_search": BeamSearch, "dvts": DVTS, "self_consistency": SelfConsistency}
assert set(POLICIES) == set(ALGORITHMS)


def policy_for(config: SearchConfig) -> SelectionPolicy:
    return POLICIES[config.algorithm](config)


__all__ = ["ALGORITHMS", "SearchConfig", "SelectionPolicy", "policy_for", "top_ancestors"]
