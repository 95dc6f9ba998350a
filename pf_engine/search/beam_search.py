"""Beam search: keep the N / beam_width best particles of a problem by PRM score and extend
each beam_width ways (deterministic selection)."""

import numpy as np
import torch

from pf_engine.search.algorithm import Algorithm


def top_ancestors(aggregates: torch.Tensor, group: int, beam_width: int) -> list[int]:
    """In every group of ``group`` particles, the best ``group // beam_width`` (by aggregate,
    ties to the lower slot), each taken ``beam_width`` times.

    Beam search uses group = num_particles; DVTS uses group = beam_width (one survivor per subtree).
    """
    scores = aggregates.view(-1, group)
    keep = group // beam_width
    best = torch.topk(scores, keep, dim=1, sorted=True).indices  # [num_groups, keep]
    base = torch.arange(scores.shape[0])[:, None] * group
    return (best + base).repeat_interleave(beam_width, dim=1).flatten().tolist()


class BeamSearch(Algorithm):
    @classmethod
    def check(cls, config):
        if config.beam_width < 1 or config.num_particles % config.beam_width:
            raise ValueError(f"{config.algorithm} needs num_particles ({config.num_particles}) to be a multiple of "
                             f"beam_width ({config.beam_width})")

    def group(self) -> int:
        return self.config.num_particles

    def select(self, engine, batch, out):
        n, width = self.config.num_particles, self.config.beam_width
        aggregates = out.aggregates.cpu()
        return [None if d else np.array(top_ancestors(aggregates[b * n:(b + 1) * n], self.group(), width))
                for b, d in enumerate(batch.done)]
