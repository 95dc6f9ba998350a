"""Particle filtering (Puri et al. 2025): score every step, resample every step (or
when the ESS falls below the threshold) by the fused step's ancestors."""

from pf_engine.search.algorithm import Algorithm, local


class ParticleFilter(Algorithm):
    def select(self, engine, batch, out):
        n = self.config.num_particles
        return [None if d else local(out, b, n) for b, d in enumerate(batch.done)]
