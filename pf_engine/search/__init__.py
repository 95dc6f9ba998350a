"""Search algorithms, each a small Algorithm object over the same engine loop, so
comparisons are fair:

- particle_filter: score every step, resample every step (Puri et al. 2025)
- entropic_particle_filter: particle filtering whose weights are annealed while the particles
  collapse early (arXiv 2510.05825)
- particle_gibbs: sweeps of particle filtering, each conditioned on a reference path
  drawn from the previous sweep (conditional SMC), optionally with ancestor sampling
- best_of_n: N independent samples; the PRM's running score of each ranks them
- beam_search: keep the N / beam_width best by PRM score, extend each beam_width ways
- dvts: N / beam_width independent subtrees, each keeping its best and extending it beam_width ways
- self_consistency: N independent samples, no PRM; majority vote

Each is an Algorithm subclass in its own module, registered by name below
(pf_engine.search.registry): SearchConfig, the CLI, the server and eval read the registry.
"""

from pf_engine.search.algorithm import Algorithm
from pf_engine.search.beam_search import BeamSearch, top_ancestors
from pf_engine.search.best_of_n import BestOfN
from pf_engine.search.config import SearchConfig
from pf_engine.search.dvts import DVTS
from pf_engine.search.entropic_particle_filter import EntropicParticleFilter
from pf_engine.search.particle_filter import ParticleFilter
from pf_engine.search.particle_gibbs import ParticleGibbs
from pf_engine.search.registry import ALGORITHMS, register
from pf_engine.search.self_consistency import SelfConsistency

register("particle_filter", ParticleFilter)
register("entropic_particle_filter", EntropicParticleFilter)
register("particle_gibbs", ParticleGibbs)
register("best_of_n", BestOfN)
register("beam_search", BeamSearch)
register("dvts", DVTS)
register("self_consistency", SelfConsistency)


def algorithm_for(config: SearchConfig) -> Algorithm:
    return ALGORITHMS[config.algorithm](config)


__all__ = ["ALGORITHMS", "Algorithm", "SearchConfig", "algorithm_for", "register", "top_ancestors"]
