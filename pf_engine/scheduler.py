"""Continuous batching over problems.

Problems wait in a queue and are admitted while the pools' free blocks allow
(keeping a small reserve), not by their worst case. Every forward batches the
writing particles of all running problems, one token each. A problem whose live
particles have all ended the step is scored, weighed and resampled at once,
with the other problems that are ready in the same iteration, while the rest
keep decoding. A finished problem frees its blocks and leaves.

When a forward does not fit, the most recently admitted problem is preempted:
its blocks are freed and it goes back to the front of the queue; when there is
room again its particles are rebuilt from its search tree (recompute: each
shared prefix prefilled once, then forked) and it redoes the round it was in.
Draws are keyed by (problem, round, slot, token), so it writes the same tokens
again and nothing depends on admission order or preemption.

One iteration::

    admit()      waiting -> running while blocks allow
    sample()     one token for every writing particle, step-end rules
    feed()       the forward (preempting the newest problem while it does not fit)
    end_rounds() problems whose step ended everywhere: score, weigh, select, follow
"""

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pf_engine.engine import ParticleEngine, Problem
from pf_engine.errors import OutOfBlocksError, size
from pf_engine.philox import RESAMPLE_TOKEN, search_uniforms
from pf_engine.search.config import SearchConfig
from pf_engine.search.policy import SelectionPolicy

# Admission keeps this share of a pool free beyond the running round's needs (copy-on-write
# copies, rounds that outgrow a step); preemption handles what it does not cover.
RESERVE_FRACTION = 0.02


class Scheduler:
    """Runs ``problems`` (fresh Problems) under one search config; :meth:`run` yields each
    Problem as it finishes."""

    def __init__(self, engine: ParticleEngine, policy: SelectionPolicy, config: SearchConfig,
                 problems: list[Problem], bytes_per_block: int):
        self.engine, self.policy, self.config = engine, policy, config
        self.waiting: deque[Problem] = deque(problems)
        self.running: list[Problem] = []  # in admission order: the newest is preempted first
        self.bytes_per_block = bytes_per_block
        self.generated = np.zeros(len(problems), dtype=np.int64)  # tokens drawn per problem index
        self.num_preemptions = 0

    @property
    def managers(self) -> list:
        runners = [self.engine.policy] + ([self.engine.prm_runner] if self.engine.prm_runner else [])
        return [runner.manager for runner in runners]

    def run(self) -> Iterator[Problem]:
        """Every problem to the end of its search, as they finish. On any exception (a PRM
        callable's, KeyboardInterrupt, the consumer closing the generator) every sequence made
        here is freed: the pools are as they were before the call."""
        before = [set(manager.seq_ids().tolist()) for manager in self.managers]
        try:
            while self.waiting or self.running:
                self.admit()
                yield from self.step()
        except BaseException:
            for manager, kept in zip(self.managers, before, strict=True):
                for seq in set(manager.seq_ids().tolist()) - kept:
                    manager.free(seq)
            raise

    # -- admission and preemption ------------------------------------------------
    def admit(self) -> None:
        while self.waiting:
            problem = self.waiting[0]
            if self.running and not self._has_room_for(problem):
                return
            try:
                self.engine.place(problem)
            except OutOfBlocksError:
                if self.running:
                    return  # wait until running problems give blocks back
                raise self._too_big(problem, "be placed") from None
            self.waiting.popleft()
            self.running.append(problem)
            self.policy.prepare_round(problem)
            self.engine.begin_round(problem)

    def _has_room_for(self, problem: Problem) -> bool:
        """Whether the pools can take ``problem`` and still let every running particle, and the
        newcomer's, finish the step it is writing: a round's needs, never a whole search's."""
        engine, rows = self.engine, self.engine.rows
        bs = engine.policy.manager.block_size
        writing = np.flatnonzero(rows.writing)
        to_write = self.config.max_step_tokens - rows.step_len[writing]
        round_blocks = int((-(-to_write // bs)).sum()) + problem.num_particles * -(-self.config.max_step_tokens // bs)
        needs = [engine.blocks_to_place(problem) + round_blocks]
        if engine.prm_runner is not None:
            needs.append(engine.prm_blocks_to_place(problem) + len(writing))
        for manager, need in zip(self.managers, needs, strict=True):
            if manager.num_free_blocks < need + int(RESERVE_FRACTION * manager.num_blocks):
                return False
        return True

    def _preempt_newest(self, keep: Problem | None = None) -> Problem:
        """Preempt the most recently admitted problem other than ``keep``; OutOfBlocksError if none."""
        candidates = [p for p in self.running if p is not keep]
        if not candidates:
            raise self._too_big(keep or self.running[0], "go on")
        self._preempt(candidates[-1])
        return candidates[-1]

    def _preempt(self, victim: Problem) -> None:
        """Free all of ``victim``'s blocks and put it back at the front of the queue, as it was
        at the start of its round (a round it had begun to end is taken back)."""
        victim.discarded_tokens += int(self.engine.rows.step_len[victim.rows].sum())  # the round it redoes
        self.engine.rollback(victim)
        self.engine.evict(victim)
        victim.forced = {}
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(victim)
        self.waiting.appendleft(victim)

    def _too_big(self, problem: Problem, what: str) -> OutOfBlocksError:
        manager = self.engine.policy.manager
        return OutOfBlocksError(
            f"problem {problem.index} cannot {what} even alone: with {problem.num_particles} particles at step "
            f"{problem.step} (sweep {problem.sweep}) it needs more than the {manager.num_blocks} KV blocks "
            f"({size(manager.num_blocks * self.bytes_per_block)}) of the cache: raise kv_cache_memory or lower "
            f"num_particles / max_new_tokens")

    # -- one iteration -------------------------------------------------------------
    def step(self) -> list[Problem]:
        engine, rows_table = self.engine, self.engine.rows
        rows = np.flatnonzero(rows_table.writing)
        ready = []
        if len(rows):
            by_index = {p.index: p for p in self.running}
            tokens, feed, stopped = engine.sample(rows)
            problem_of = rows_table.problem[rows]
            self.generated += np.bincount(problem_of, minlength=len(self.generated))
            stops = np.bincount(problem_of[stopped], minlength=len(self.generated))
            for index in np.flatnonzero(stops).tolist():
                by_index[index].num_writing -= int(stops[index])
            self._feed(rows[feed], tokens[feed])
        ready = [p for p in self.running if p.num_writing == 0]
        return self.end_rounds(ready) if ready else []

    def _feed(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        while True:
            try:
                self.engine.feed(rows, tokens)
                return
            except OutOfBlocksError:
                if len(self.running) == 1:
                    raise self._too_big(self.running[0], "go on") from None
                victim_rows = self.running[-1].rows
                self._preempt_newest()
                keep = ~np.isin(rows, victim_rows)
                rows, tokens = rows[keep], tokens[keep]

    # -- the end of a round ----------------------------------------------------------
    def end_rounds(self, ready: list[Problem]) -> list[Problem]:
        """Score, weigh, select and follow every problem in ``ready`` together; returns those
        that finished (evicted, results ready)."""
        engine, policy, cfg = self.engine, self.policy, self.config
        n = cfg.num_particles
        batch = engine.end_round(ready)
        if policy.scores:
            if engine.prm is None:
                raise ValueError(f"{cfg.algorithm} needs a PRM")
            while True:
                try:
                    engine.score(batch)
                    break
                except OutOfBlocksError:  # the PRM's pool: make room, never by preempting the oldest ready problem
                    victim = self._preempt_newest(keep=batch.problems[0])
                    if victim in batch.problems:
                        batch.drop(victim)
        batch.nodes = [engine.commit_round(p, s) for p, s in zip(batch.problems, batch.steps, strict=True)]
        batch.done = [p.step == cfg.max_steps - 1 or bool(p.finished.all()) for p in batch.problems]
        if batch.prm_output is not None:
            params = cfg.resample_params(batch.reward_kind)
            while True:
                out = engine.weigh(batch, params, self._resample_uniforms(batch.problems))
                try:
                    ancestors = policy.select(engine, batch, out)
                    break
                except OutOfBlocksError:  # ancestor sampling's spliced futures: make room and weigh again
                    victim = self._preempt_newest(keep=batch.problems[0])
                    if victim in batch.problems:  # it redoes this round later; the others go on without it
                        batch.drop(victim)
            rewards, weights = out.rewards.cpu().tolist(), out.weights.cpu()
            weight_list = weights.tolist()
            for b, (p, stepped, new) in enumerate(zip(batch.problems, batch.steps, batch.nodes, strict=True)):
                for (slot, _, _), node in zip(stepped, new, strict=True):
                    p.tree[node].reward, p.tree[node].weight = rewards[b * n + slot], weight_list[b * n + slot]
            aggregates, num_steps = out.aggregates.cpu(), out.num_steps.cpu()
            for b, (p, chosen) in enumerate(zip(batch.problems, ancestors, strict=True)):
                part = slice(b * n, (b + 1) * n)
                if chosen is None:
                    p.aggregates, p.num_steps, p.weights = aggregates[part], num_steps[part], weights[part]
                else:
                    p.aggregates, p.num_steps = aggregates[part][chosen], num_steps[part][chosen]
                    p.weights = torch.full((n,), 1.0 / n)  # the new generation weighs the same
                    engine.follow(p, chosen)
        finished = []
        for p, d in zip(batch.problems, batch.done, strict=True):
            if d and not policy.end_sweep(engine, p):
                p.tokens_generated = int(self.generated[p.index])
                engine.evict(p)
                self.running.remove(p)
                finished.append(p)
                continue
            if not d:
                p.step += 1
            policy.prepare_round(p)
            engine.begin_round(p)
        return finished

    def _resample_uniforms(self, ready: list[Problem]) -> torch.Tensor:
        n = self.config.num_particles
        keys = torch.tensor([p.key for p in ready]).repeat_interleave(n)
        rounds = torch.tensor([p.round_(self.config.max_steps) for p in ready]).repeat_interleave(n)
        return search_uniforms(self.config.seed, keys, rounds, torch.arange(n).repeat(len(ready)), RESAMPLE_TOKEN)
