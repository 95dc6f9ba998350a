"""Search algorithms over the ParticleEngine. All share one loop, so comparisons are fair:

- particle_filter: score every step, resample every step (Puri et al. 2025)
- best_of_n: N independent samples; the PRM's running score of each ranks them
- beam_search: keep the N / beam_width best by PRM score, extend each beam_width ways
- dvts: N / beam_width independent subtrees, each keeping its best and extending it beam_width ways
- self_consistency: N independent samples, no PRM; majority vote
"""

from dataclasses import dataclass

import torch

from pf_engine.engine import Particle, ParticleEngine, TreeNode
from pf_engine.search.config import ALGORITHMS, SearchConfig

__all__ = ["ALGORITHMS", "ProblemOutcome", "SearchConfig", "run_search"]

# algorithm -> (score every step with the PRM, how the next generation is chosen)
_MODES = {"particle_filter": (True, "resample"), "best_of_n": (True, None), "beam_search": (True, "top"),
          "dvts": (True, "top"), "self_consistency": (False, None)}


def top_ancestors(aggregates: torch.Tensor, group: int, beam_width: int) -> list[int]:
    """Deterministic selection: in every group of ``group`` particles, the best ``group // beam_width``
    (by aggregate, ties to the lower slot), each taken ``beam_width`` times.

    Beam search uses group = num_particles; DVTS uses group = beam_width (one survivor per subtree).
    """
    scores = aggregates.view(-1, group)
    keep = group // beam_width
    best = torch.topk(scores, keep, dim=1, sorted=True).indices  # [num_groups, keep]
    base = torch.arange(scores.shape[0])[:, None] * group
    return (best + base).repeat_interleave(beam_width, dim=1).flatten().tolist()


@dataclass
class ProblemOutcome:
    particles: list[Particle]  # the final particles of one problem
    weights: list[float]  # their normalized weights
    tree: list[TreeNode]  # every step of every particle of this problem


def run_search(engine: ParticleEngine, questions: list[str], keys: list[int], cfg: SearchConfig) -> list[ProblemOutcome]:
    """Run ``cfg.algorithm`` on a batch of problems; ``keys`` name the problems in the random streams."""
    score, selection = _MODES[cfg.algorithm]
    n = cfg.num_particles
    particles = engine.start(questions, n)
    aggregates = torch.zeros(len(particles))
    num_steps = torch.zeros(len(particles), dtype=torch.int32)
    weights = torch.full((len(particles),), 1.0 / n)
    tree: list[TreeNode] = []
    for round_ in range(cfg.max_steps):
        stepped = engine.expand(particles, keys, round_, cfg.sampling, cfg.seed, cfg.step_delimiter,
                                cfg.max_step_tokens, cfg.max_new_tokens, cfg.stop_at_boxed)
        for p in stepped:
            tree.append(TreeNode(len(tree), p.problem, p.node, len(p.steps) - 1, p.steps[-1], finished=p.finished))
            p.node = tree[-1].node
        done = round_ == cfg.max_steps - 1 or all(p.finished for p in particles)
        if score and stepped:
            prm_output, live, kind = engine.score(questions, particles, stepped)
            out = engine.weigh(particles, keys, round_, prm_output, live, aggregates, num_steps,
                               cfg.resample_params(kind), cfg.seed, n)
            rewards, step_weights = out.rewards.cpu().tolist(), out.weights.cpu().tolist()
            for p, reward, weight in zip(particles, rewards, step_weights):
                if reward == reward:  # NaN where the particle wrote no step this round
                    tree[p.node].reward, tree[p.node].weight = reward, weight
            if selection and not done:
                if selection == "resample":
                    ancestors = out.ancestors.cpu().tolist()
                    aggregates, num_steps = out.next_aggregates.cpu(), out.next_num_steps.cpu()
                else:
                    group = n if cfg.algorithm == "beam_search" else cfg.beam_width
                    ancestors = top_ancestors(out.aggregates.cpu(), group, cfg.beam_width)
                    aggregates, num_steps = out.aggregates.cpu()[ancestors], out.num_steps.cpu()[ancestors]
                for a in ancestors:
                    tree[particles[a].node].num_children += 1
                particles = engine.follow(particles, ancestors, n)
                weights = torch.full((len(particles),), 1.0 / n)  # the new generation weighs the same
            else:
                aggregates, num_steps, weights = out.aggregates.cpu(), out.num_steps.cpu(), out.weights.cpu()
        if done or not stepped:
            break
    outcomes = [
        ProblemOutcome(particles[b * n:(b + 1) * n], weights[b * n:(b + 1) * n].tolist(),
                       [node for node in tree if node.problem == b])
        for b in range(len(questions))
    ]
    engine.release(particles)
    return outcomes
