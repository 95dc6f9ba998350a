"""Search algorithms over the ParticleEngine. All share one loop, so comparisons are fair:

- particle_filter: score every step, resample every step (Puri et al. 2025)
- particle_gibbs: sweeps of particle filtering, each conditioned on a reference path
  drawn from the previous sweep (conditional SMC), optionally with ancestor sampling
- best_of_n: N independent samples; the PRM's running score of each ranks them
- beam_search: keep the N / beam_width best by PRM score, extend each beam_width ways
- dvts: N / beam_width independent subtrees, each keeping its best and extending it beam_width ways
- self_consistency: N independent samples, no PRM; majority vote
"""

from dataclasses import dataclass

import numpy as np
import torch

from pf_engine.engine import Particle, ParticleEngine, TreeNode
from pf_engine.philox import ANCESTOR_TOKEN, REFERENCE_TOKEN, search_uniforms
from pf_engine.resample import resample
from pf_engine.sampling import SamplingParams, sample
from pf_engine.search.config import ALGORITHMS, SearchConfig

__all__ = ["ALGORITHMS", "ProblemOutcome", "SearchConfig", "run_search"]

# algorithm -> (score every step with the PRM, how the next generation is chosen)
_MODES = {"particle_filter": (True, "resample"), "particle_gibbs": (True, "resample"), "best_of_n": (True, None),
          "beam_search": (True, "top"), "dvts": (True, "top"), "self_consistency": (False, None)}


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


@dataclass
class Reference:
    """Particle Gibbs: the path slot 0 replays in the next sweep."""

    step_ids: list[list[int]]
    steps: list[str]
    finished: bool


def run_search(engine: ParticleEngine, questions: list[str], keys: list[int],
               cfg: SearchConfig) -> list[ProblemOutcome]:
    """Run ``cfg.algorithm`` on a batch of problems; ``keys`` name the problems in the random streams."""
    n = cfg.num_particles
    tree: list[TreeNode] = []
    references: list[Reference | None] = [None] * len(questions)
    for sweep in range(cfg.num_sweeps):
        particles, weights = _sweep(engine, questions, keys, cfg, sweep, references, tree)
        engine.release(particles)
        if sweep + 1 < cfg.num_sweeps:
            references = _draw_references(particles, weights, keys, cfg, sweep)
    return [
        ProblemOutcome(particles[b * n:(b + 1) * n], weights[b * n:(b + 1) * n].tolist(),
                       [node for node in tree if node.problem == b])
        for b in range(len(questions))
    ]


def _sweep(engine: ParticleEngine, questions, keys, cfg: SearchConfig, sweep: int,
           references: list[Reference | None], tree: list[TreeNode]) -> tuple[list[Particle], torch.Tensor]:
    """One pass of the step loop from the prompts; slot 0 of a problem with a reference replays it."""
    score, selection = _MODES[cfg.algorithm]
    n = cfg.num_particles
    particles = engine.start(questions, n)
    aggregates = torch.zeros(len(particles))
    num_steps = torch.zeros(len(particles), dtype=torch.int32)
    weights = torch.full((len(particles),), 1.0 / n)
    for step in range(cfg.max_steps):
        round_ = sweep * cfg.max_steps + step  # names the round in the random streams
        replaying = set()
        for b, ref in enumerate(references):
            p = particles[b * n]
            if ref is not None and not p.finished and step < len(ref.step_ids):
                p.forced, p.forced_finishes = ref.step_ids[step], ref.finished and step == len(ref.step_ids) - 1
                replaying.add(id(p))
        stepped = engine.expand(particles, keys, round_, cfg.sampling, cfg.seed, cfg.step_delimiter,
                                cfg.max_step_tokens, cfg.max_new_tokens, cfg.stop_at_boxed)
        for p in stepped:
            tree.append(TreeNode(len(tree), p.problem, p.node, len(p.steps) - 1, p.steps[-1], finished=p.finished,
                                 iteration=sweep, reference=id(p) in replaying))
            p.node = tree[-1].node
        done = step == cfg.max_steps - 1 or all(p.finished for p in particles)
        if score and stepped:
            prm_output, live, kind = engine.score(questions, particles, stepped)
            out = engine.weigh(particles, keys, round_, prm_output, live, aggregates, num_steps,
                               cfg.resample_params(kind), cfg.seed, n)
            rewards, step_weights = out.rewards.cpu().tolist(), out.weights.cpu().tolist()
            for p, reward, weight in zip(particles, rewards, step_weights, strict=True):
                if reward == reward:  # NaN where the particle wrote no step this round
                    tree[p.node].reward, tree[p.node].weight = reward, weight
            if selection and not done:
                if selection == "resample":
                    ancestors = out.ancestors.cpu().tolist()
                    _condition_on_references(engine, questions, keys, cfg, particles, references, out, ancestors,
                                             step, round_)
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
    return particles, weights


def _condition_on_references(engine: ParticleEngine, questions, keys, cfg: SearchConfig, particles, references,
                             out, ancestors: list[int], step: int, round_: int) -> None:
    """Conditional resampling: slot 0 of a problem with a reference keeps it, or, with ancestor
    sampling, takes the reference's remaining steps onto an ancestor drawn for them (in place)."""
    n = cfg.num_particles
    resampled = out.resampled.cpu().tolist()
    spliced = []
    for b, ref in enumerate(references):
        if ref is None or not resampled[b]:
            continue
        ancestors[b * n] = b * n
        if cfg.ancestor_sampling and step + 1 < len(ref.step_ids) and not particles[b * n].finished:
            spliced.append(b)
    if not spliced:
        return
    weights = out.weights.cpu()
    candidates = [i for b in spliced for i in range(b * n, (b + 1) * n)
                  if not particles[i].finished and weights[i] > 0]
    problem_of = [particles[i].problem for i in candidates]
    futures = [references[b].step_ids[step + 1:] for b in problem_of]
    loglik, prm_outputs = engine.splice(questions, [particles[i] for i in candidates], futures,
                                        [references[b].steps[step + 1:] for b in problem_of], cfg.sampling)
    logw = torch.log(weights[candidates].double()) + loglik
    # The weights the spliced steps would get, step after step, within each problem's candidates.
    params = cfg.resample_params(engine.prm.reward_kind)
    aggregates, num_steps = out.aggregates.cpu()[candidates], out.num_steps.cpu()[candidates]
    for k, prm_output in enumerate(prm_outputs):
        rows = torch.tensor([i for i, f in enumerate(futures) if len(f) > k])
        seg = np.concatenate([[0], np.cumsum(np.unique(np.asarray(problem_of)[rows.numpy()], return_counts=True)[1])])
        spliced_out = resample(seg, prm_output, torch.ones(len(rows), dtype=torch.bool), aggregates[rows],
                               num_steps[rows], params, uniforms=torch.zeros(len(rows)))
        logw[rows] += torch.log(spliced_out.weights.double())
        aggregates[rows], num_steps[rows] = spliced_out.aggregates, spliced_out.num_steps
    # One draw per problem, by inverse CDF over its slots (-inf where a slot is no candidate).
    table = torch.full((len(spliced) * n,), float("-inf"), dtype=torch.float64)
    row_of = {b: r for r, b in enumerate(spliced)}
    table[[row_of[b] * n + i % n for i, b in zip(candidates, problem_of, strict=True)]] = logw
    uniforms = search_uniforms(cfg.seed, [keys[b] for b in spliced], round_, 0, ANCESTOR_TOKEN)
    chosen = sample(table.view(len(spliced), n), SamplingParams(temperature=1.0), uniforms=uniforms).tolist()
    for b, slot in zip(spliced, chosen, strict=True):
        ancestors[b * n] = b * n + slot


def _draw_references(particles: list[Particle], weights: torch.Tensor, keys, cfg: SearchConfig,
                     sweep: int) -> list[Reference]:
    """Each problem's next reference: one of its final particles, drawn by weight."""
    n = cfg.num_particles
    num_problems = len(particles) // n
    logw = torch.log(weights.double().view(num_problems, n))
    round_ = (sweep + 1) * cfg.max_steps - 1
    uniforms = search_uniforms(cfg.seed, keys[:num_problems], round_, 0, REFERENCE_TOKEN)
    chosen = sample(logw, SamplingParams(temperature=1.0), uniforms=uniforms).tolist()
    picked = [particles[b * n + c] for b, c in enumerate(chosen)]
    return [Reference([list(ids) for ids in p.step_ids], list(p.steps), p.finished) for p in picked]
