"""Continuous batching over problems.

Each problem brings its own search (config and selection policy): problems of
different configs decode in the same forwards, and those of one policy object
end their rounds in one fused call. Problems can be added while others run
(a server's requests join at the next iteration) and cancelled between
iterations.

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
    end_rounds() problems whose step ended everywhere, by policy: score, weigh, select, follow
"""

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pf_engine.engine import ParticleEngine
from pf_engine.errors import OutOfBlocksError, size
from pf_engine.philox import RESAMPLE_TOKEN, search_uniforms
from pf_engine.search.config import SearchConfig
from pf_engine.state import Problem

# Admission keeps this share of a pool free beyond the running round's needs (copy-on-write
# copies, rounds that outgrow a step); preemption handles what it does not cover.
RESERVE_FRACTION = 0.02


class Scheduler:
    """Runs Problems (fresh, each with its ``rules`` and ``policy``) to the end of their searches.

    NOTE: a problem is in exactly one of ``waiting`` and ``running`` from :meth:`add` until
    it finishes or is cancelled; a running problem holds a lane (``problem.lane``, its
    index in ``lanes``) and its rows and sequences, a waiting one none of them.
    """

    def __init__(self, engine: ParticleEngine, bytes_per_block: int, problems: list[Problem] = (),
                 max_running: int | None = None):
        self.engine, self.max_running = engine, max_running
        self.waiting: deque[Problem] = deque(problems)
        self.running: list[Problem] = []  # in admission order: the newest is preempted first
        self.bytes_per_block = bytes_per_block
        self.lanes: list[Problem | None] = []
        self.generated = np.zeros(0, dtype=np.int64)  # tokens drawn per lane since it was taken
        self.num_preemptions = 0
        engine.begin()

    def add(self, problem: Problem) -> None:
        self.waiting.append(problem)

    def cancel(self, problem: Problem) -> None:
        """Take ``problem`` out (between iterations): its blocks and rows go back to the pools."""
        if problem in self.waiting:
            self.waiting.remove(problem)
        elif problem in self.running:
            self.engine.rollback(problem)
            self._leave(problem)

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
                yield from self.iterate()
        except BaseException:
            self.free_sequences(keep=before)
            raise

    def free_sequences(self, keep: list[set] | None = None) -> None:
        """Free every sequence of the pools but those in ``keep`` (one set per manager): what a failed
        iteration left, whichever problem held it."""
        for i, manager in enumerate(self.managers):
            for seq in set(manager.seq_ids().tolist()) - (keep[i] if keep else set()):
                manager.free(seq)

    def iterate(self) -> list[Problem]:
        """One iteration: admit, then one token for every writing particle; returns the problems
        that finished in it."""
        self.admit()
        return self.step()

    def _take_lane(self, problem: Problem) -> None:
        free = [i for i, p in enumerate(self.lanes) if p is None]
        if not free:
            free = [len(self.lanes)]
            self.lanes.append(None)
            self.generated = np.append(self.generated, 0)
        problem.lane = free[0]
        self.lanes[problem.lane] = problem
        self.generated[problem.lane] = 0

    def _leave(self, problem: Problem) -> None:
        """Evict a running problem, keeping the tokens it drew."""
        problem.tokens_generated += int(self.generated[problem.lane])
        self.engine.evict(problem)
        self.lanes[problem.lane] = None
        problem.lane = -1
        self.running.remove(problem)

    # -- admission and preemption ------------------------------------------------
    def admit(self) -> None:
        while self.waiting:
            problem = self.waiting[0]
            if self.max_running is not None and len(self.running) >= self.max_running:
                return
            if self.running and not self._has_room_for(problem):
                return
            self._take_lane(problem)
            try:
                self.engine.place(problem)
            except BaseException as e:
                self.lanes[problem.lane], problem.lane = None, -1
                if isinstance(e, OutOfBlocksError) and self.running:
                    return  # wait until running problems give blocks back
                if isinstance(e, OutOfBlocksError):
                    raise self._too_big(problem, "be placed") from None
                raise
            self.waiting.popleft()
            self.running.append(problem)
            problem.policy.prepare_round(problem)
            self.engine.begin_round(problem)

    def _has_room_for(self, problem: Problem) -> bool:
        """Whether the pools can take ``problem`` and still let every running particle, and the
        newcomer's, finish the step it is writing: a round's needs, never a whole search's."""
        engine, rows = self.engine, self.engine.rows
        bs = engine.policy.manager.block_size
        writing = np.flatnonzero(rows.writing)
        max_step_tokens = np.array([rule.max_step_tokens for rule in engine.rules])[rows.rule[writing]]
        to_write = max_step_tokens - rows.step_len[writing]
        round_blocks = (int((-(-to_write // bs)).sum())
                        + problem.num_particles * -(-problem.rules.max_step_tokens // bs))
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
        self._leave(victim)
        victim.forced = {}
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _too_big(self, problem: Problem, what: str) -> OutOfBlocksError:
        """The error for ``problem``, the only one running (or, to be placed, with none running): no
        other problem's state is touched when it is raised, so a server cancels it alone and goes on."""
        manager = self.engine.policy.manager
        error = OutOfBlocksError(
            f"problem {problem.index} cannot {what} even alone: with {problem.num_particles} particles at step "
            f"{problem.step} (sweep {problem.sweep}) it needs more than the {manager.num_blocks} KV blocks "
            f"({size(manager.num_blocks * self.bytes_per_block)}) of the cache: raise kv_cache_memory or lower "
            f"num_particles / max_new_tokens")
        error.problem = problem
        return error

    # -- one iteration -------------------------------------------------------------
    def step(self) -> list[Problem]:
        engine, rows_table = self.engine, self.engine.rows
        rows = np.flatnonzero(rows_table.writing)
        ready = []
        if len(rows):
            tokens, feed, stopped = engine.sample(rows)
            lane_of = rows_table.problem[rows]
            self.generated += np.bincount(lane_of, minlength=len(self.generated))
            stops = np.bincount(lane_of[stopped], minlength=len(self.generated))
            for lane in np.flatnonzero(stops).tolist():
                self.lanes[lane].num_writing -= int(stops[lane])
            self._feed(rows[feed], tokens[feed])
        ready = [p for p in self.running if p.num_writing == 0]
        if not ready:
            return []
        by_policy: dict[int, list[Problem]] = {}
        for p in ready:
            by_policy.setdefault(id(p.policy), []).append(p)
        finished = []
        for group in by_policy.values():
            group = [p for p in group if p in self.running]  # an earlier group's scoring may have preempted some
            if group:
                finished += self.end_rounds(group)
        return finished

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
        engine, policy = self.engine, ready[0].policy
        cfg = policy.config
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
                out = engine.weigh(batch, params, self._resample_uniforms(cfg, batch.problems))
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
                self._leave(p)
                finished.append(p)
                continue
            if not d:
                p.step += 1
            policy.prepare_round(p)
            engine.begin_round(p)
        return finished

    @staticmethod
    def _resample_uniforms(config: SearchConfig, ready: list[Problem]) -> torch.Tensor:
        """The resampling uniforms of each problem's slots, from its own seed."""
        n = config.num_particles
        seeds = [p.rules.seed for p in ready]
        groups = [ready] if len(set(seeds)) == 1 else [[p] for p in ready]
        out = []
        for group in groups:
            keys = torch.tensor([p.key for p in group]).repeat_interleave(n)
            rounds = torch.tensor([p.round_(config.max_steps) for p in group]).repeat_interleave(n)
            out.append(search_uniforms(group[0].rules.seed, keys, rounds, torch.arange(n).repeat(len(group)),
                                       RESAMPLE_TOKEN))
        return torch.cat(out)
