"""Particle Gibbs: sweeps of particle filtering, each conditioned on a reference path drawn
from the previous sweep (conditional SMC), optionally with ancestor sampling.

From the second sweep on, slot 0 of a problem replays its reference step by step
and keeps itself as its ancestor; the other slots draw their ancestors
multinomially (the config's scheme is not used: a draw that keeps the reference
out must be independent per particle). With ancestor sampling the reference is
re-attached after every step to a prefix drawn among the live particles by
weight x the likelihood of the reference's remaining steps after that prefix x
the weights those spliced steps would get there.
"""

from dataclasses import dataclass

import numpy as np
import torch

from pf_engine.philox import ANCESTOR_TOKEN, REFERENCE_TOKEN, search_uniforms
from pf_engine.prm import StepToScore
from pf_engine.resample import resample
from pf_engine.sampling import SamplingParams, filtered_logits, sample
from pf_engine.search.algorithm import Algorithm, local


@dataclass
class Reference:
    """The path slot 0 replays in the next sweep."""

    step_ids: list[list[int]]
    steps: list[str]
    finished: bool


class ParticleGibbs(Algorithm):
    @classmethod
    def scheme(cls, config):
        return "multinomial"  # a draw that keeps the reference out must be independent per particle

    def prepare_round(self, problem):
        ref = problem.extra.get("reference")
        if ref is not None and not problem.finished[0] and problem.step < len(ref.step_ids):
            last = problem.step == len(ref.step_ids) - 1
            problem.forced = {0: (ref.step_ids[problem.step], ref.finished and last)}

    def select(self, engine, batch, out):
        cfg, n = self.config, self.config.num_particles
        problems, done = batch.problems, batch.done
        ancestors = [None if d else local(out, b, n) for b, d in enumerate(done)]
        resampled = out.resampled.cpu().tolist()
        spliced = []
        for b, p in enumerate(problems):
            ref = p.extra.get("reference")
            if done[b] or ref is None or not resampled[b]:
                continue
            ancestors[b][0] = 0
            if cfg.ancestor_sampling and p.step + 1 < len(ref.step_ids) and not p.finished[0]:
                spliced.append(b)
        if spliced:
            for b, slot in zip(spliced, self._ancestors_of_references(engine, problems, out, spliced), strict=True):
                ancestors[b][0] = slot
        return ancestors

    def _ancestors_of_references(self, engine, problems, out, spliced) -> list[int]:
        """For each problem in ``spliced``: the slot its reference's remaining steps are spliced onto."""
        cfg, n = self.config, self.config.num_particles
        weights, aggregates, num_steps = out.weights.cpu(), out.aggregates.cpu(), out.num_steps.cpu()
        # A prefix the reference's future would carry past max_new_tokens has probability 0 there.
        room = {b: cfg.max_new_tokens - sum(map(len, problems[b].extra["reference"].step_ids[problems[b].step + 1:]))
                for b in spliced}
        candidates = [(b, slot) for b in spliced for slot in range(n)
                      if not problems[b].finished[slot] and weights[b * n + slot] > 0
                      and problems[b].num_tokens[slot] <= room[b]]
        flat = torch.tensor([b * n + slot for b, slot in candidates])
        futures = [problems[b].extra["reference"].step_ids[problems[b].step + 1:] for b, _ in candidates]
        texts = [problems[b].extra["reference"].steps[problems[b].step + 1:] for b, _ in candidates]
        loglik, prm_outputs = self.splice(engine, [problems[b] for b, _ in candidates], [s for _, s in candidates],
                                          futures, texts)
        logw = torch.log(weights[flat].double()) + loglik
        # The weights the spliced steps would get, step after step, within each problem's candidates.
        params = cfg.resample_params(engine.prm.reward_kind)
        aggregates, num_steps = aggregates[flat], num_steps[flat]
        problem_of = np.array([b for b, _ in candidates])
        for k, prm_output in enumerate(prm_outputs):
            rows = torch.tensor([i for i, f in enumerate(futures) if len(f) > k])
            seg = np.concatenate([[0], np.cumsum(np.unique(problem_of[rows.numpy()], return_counts=True)[1])])
            step = resample(seg, prm_output, torch.ones(len(rows), dtype=torch.bool), aggregates[rows],
                            num_steps[rows], params, uniforms=torch.zeros(len(rows)))
            logw[rows] += torch.log(step.weights.double())
            aggregates[rows], num_steps[rows] = step.aggregates, step.num_steps
        # One draw per problem, by inverse CDF over its slots (-inf where a slot is no candidate).
        table = torch.full((len(spliced) * n,), float("-inf"), dtype=torch.float64)
        row_of = {b: r for r, b in enumerate(spliced)}
        table[[row_of[b] * n + slot for b, slot in candidates]] = logw
        uniforms = torch.cat([search_uniforms(problems[b].rules.seed, [problems[b].key],
                                              [problems[b].round_(cfg.max_steps)], 0, ANCESTOR_TOKEN) for b in spliced])
        return sample(table.view(len(spliced), n), SamplingParams(temperature=1.0), uniforms=uniforms).tolist()

    def end_sweep(self, engine, problem):
        cfg = self.config
        if problem.sweep + 1 >= cfg.iterations:
            return False
        logw = torch.log(problem.weights.double())[None]
        round_ = (problem.sweep + 1) * cfg.max_steps - 1
        uniform = search_uniforms(problem.rules.seed, [problem.key], round_, 0, REFERENCE_TOKEN)
        slot = int(sample(logw, SamplingParams(temperature=1.0), uniforms=uniform)[0])
        problem.extra["reference"] = Reference(problem.step_ids(slot), problem.steps(slot),
                                               bool(problem.finished[slot]))
        engine.restart(problem)
        return True

    def splice(self, engine, problem_of, slots, futures, future_texts) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """How each candidate prefix (``problem_of[i]``'s particle ``slots[i]``) would carry a
        reference path's future (ancestor sampling).

        ``futures[i]`` / ``future_texts[i]``: token ids / texts of the steps that
        follow candidate ``i``'s prefix on the reference path (at least one). Returns

        - the log-likelihood of each future under the sampling distribution given
          its candidate's prefix: float64 [num_candidates];
        - for k = 0, 1, ...: the PRM output of the k-th future step of the
          candidates whose future has one (rows in candidate order): rewards [m]
          for a rule PRM, logits [m, 2] for a model PRM.

        The candidates' sequences are forked, extended and freed on every pool: nothing stays.
        """
        rows = np.array([p.rows[s] for p, s in zip(problem_of, slots, strict=True)], dtype=np.int64)
        with engine.timing("ancestors"):
            loglik = self._future_loglik(engine, problem_of, rows, futures)
            return loglik, self._future_rewards(engine, problem_of, slots, rows, future_texts)

    def _future_loglik(self, engine, problem_of, rows, futures) -> torch.Tensor:
        r, policy, pool = engine.table, engine.policy, engine.pools[0]
        loglik = torch.zeros(len(rows), dtype=torch.float64)
        tokens = [[t for step in future for t in step] for future in futures]
        forks = []
        try:
            for seq in r.seq_ids[rows, pool.index].tolist():
                forks.append(pool.manager.fork(seq))
            hidden = policy.forward(forks, tokens)
            for p, ids in zip(problem_of, tokens, strict=True):
                p.ancestor_tokens += len(ids)
            engine.note_blocks()
            first = policy.logits(r.hidden[torch.from_numpy(rows)])
            start = 0
            for i, ids in enumerate(tokens):
                within = hidden[start:start + len(ids) - 1]  # the last token predicts nothing we need
                start += len(ids)
                logits = torch.cat([first[i:i + 1], policy.logits(within)])
                logp = torch.log_softmax(filtered_logits(logits, self.config.sampling), dim=-1)
                loglik[i] = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).double().sum()
        finally:
            for seq in forks:
                pool.manager.free(seq)
        return loglik

    def _future_rewards(self, engine, problem_of, slots, rows, future_texts) -> list[torch.Tensor]:
        """The PRM's output of each future step, on forks of the candidates' sequences of every
        scoring pool (a model PRM's; a rule PRM reads none)."""
        scoring = engine.pools[1:]
        forks = {pool.index: [] for pool in scoring}
        try:
            for pool in scoring:
                for seq in engine.table.seq_ids[rows, pool.index].tolist():
                    forks[pool.index].append(pool.manager.fork(seq))
            seqs = forks[scoring[-1].index] if scoring else [-1] * len(rows)
            outputs = []
            for k in range(max(map(len, future_texts))):
                chosen = [i for i, texts in enumerate(future_texts) if len(texts) > k]
                outputs.append(engine.prm.score([StepToScore(problem_of[i], slots[i], seqs[i], future_texts[i][k],
                                                             tuple(future_texts[i][:k])) for i in chosen]))
            return outputs
        finally:
            for pool in scoring:
                for seq in forks[pool.index]:
                    pool.manager.free(seq)
