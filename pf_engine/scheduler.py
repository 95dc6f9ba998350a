"""Continuous batching over problems.

Each problem brings its own search (config and algorithm): problems of
different configs decode in the same forwards, and those of one algorithm object
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
    end_rounds() problems whose step ended everywhere, by algorithm: score, weigh, select, follow

Wherever a pool runs out (the forward, scoring, ancestor sampling), :meth:`Scheduler.with_room`
preempts the newest problem and retries.
"""

from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pf_engine import book
from pf_engine.core import Core
from pf_engine.errors import OutOfBlocksError, size
from pf_engine.philox import RESAMPLE_TOKEN, search_uniforms
from pf_engine.search.config import SearchConfig
from pf_engine.state import Problem, Round

# Admission keeps this share of a pool free beyond the running round's needs (copy-on-write
# copies, rounds that outgrow a step); preemption handles what it does not cover.
RESERVE_FRACTION = 0.02


class Scheduler:
    """Runs Problems (fresh, each with its ``rules`` and ``algorithm``) to the end of their searches.

    NOTE: a problem is in exactly one of ``waiting`` and ``running`` from :meth:`add` until
    it finishes or is cancelled; a running problem holds a lane (``problem.lane``, its
    index in ``lanes``) and its rows and sequences, a waiting one none of them.
    """

    def __init__(self, core: Core, bytes_per_block: int, problems: list[Problem] = (),
                 max_running: int | None = None):
        self.core, self.max_running = core, max_running
        self.waiting: deque[Problem] = deque(problems)
        self.running: list[Problem] = []  # in admission order: the newest is preempted first
        self.bytes_per_block = bytes_per_block
        self.lanes: list[Problem | None] = []
        self.generated = np.zeros(0, dtype=np.int64)  # tokens drawn per lane since it was taken
        self.num_preemptions = 0
        core.begin()

    def add(self, problem: Problem) -> None:
        self.waiting.append(problem)

    def cancel(self, problem: Problem) -> None:
        """Take ``problem`` out (between iterations): its blocks and rows go back to the pools."""
        if problem in self.waiting:
            self.waiting.remove(problem)
        elif problem in self.running:
            book.rollback(problem)
            self._leave(problem)

    def run(self) -> Iterator[Problem]:
        """Every problem to the end of its search, as they finish. On any exception (a PRM
        callable's, KeyboardInterrupt, the consumer closing the generator) every sequence made
        here is freed: the pools are as they were before the call."""
        before = [set(manager.seq_ids().tolist()) for manager in self.core.managers]
        try:
            while self.waiting or self.running:
                yield from self.iterate()
        except BaseException:
            self.free_sequences(keep=before)
            raise

    def free_sequences(self, keep: list[set] | None = None) -> None:
        """Free every sequence of the pools but those in ``keep`` (one set per pool): what a failed
        iteration left, whichever problem held it."""
        for i, manager in enumerate(self.core.managers):
            for seq in set(manager.seq_ids().tolist()) - (keep[i] if keep else set()):
                manager.free(seq)

    def iterate(self) -> list[Problem]:
        """One iteration: admit, then one token for every writing particle, then the rounds that
        ended; returns the problems that finished in it."""
        self.admit()
        self.write()
        return self.end_ready_rounds()

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
        self.core.evict(problem)
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
                self.core.place(problem)
            except BaseException as e:
                self.lanes[problem.lane], problem.lane = None, -1
                if isinstance(e, OutOfBlocksError) and self.running:
                    return  # wait until running problems give blocks back
                if isinstance(e, OutOfBlocksError):
                    raise self._too_big(problem, "be placed") from None
                raise
            self.waiting.popleft()
            self.running.append(problem)
            self._begin_round(problem)

    def _begin_round(self, problem: Problem) -> None:
        problem.algorithm.prepare_round(problem)
        self.core.begin_round(problem)

    def _has_room_for(self, problem: Problem) -> bool:
        """Whether every pool can take ``problem`` and still let every running particle, and the
        newcomer's, finish the step it is writing: a round's needs, never a whole search's."""
        max_step_tokens, step_len = self.core.writer.steps_in_flight()
        newcomer = np.full(problem.num_particles, problem.rules.max_step_tokens)
        for pool, place in zip(self.core.pools, self.core.blocks_to_place(problem), strict=True):
            need = (place + pool.blocks_to_write(pool.to_write(max_step_tokens, step_len))
                    + pool.blocks_to_write(newcomer))
            if pool.manager.num_free_blocks < need + int(RESERVE_FRACTION * pool.manager.num_blocks):
                return False
        return True

    def with_room(self, attempt: Callable, keep: Problem, on_preempt: Callable[[Problem], None]):
        """``attempt()`` until it does not run out of blocks, preempting the newest running problem
        other than ``keep`` before each retry (``on_preempt(victim)`` is told first, while the victim
        still holds its rows); OutOfBlocksError naming ``keep`` once it runs alone."""
        while True:
            try:
                return attempt()
            except OutOfBlocksError:
                candidates = [p for p in self.running if p is not keep]
                if not candidates:
                    raise self._too_big(keep, "go on") from None
                on_preempt(candidates[-1])
                self._preempt(candidates[-1])

    def _preempt(self, victim: Problem) -> None:
        """Free all of ``victim``'s blocks and put it back at the front of the queue, as it was
        at the start of its round (a round it had begun to end is taken back)."""
        victim.discarded_tokens += int(self.core.table.step_len[victim.rows].sum())  # the round it redoes
        book.rollback(victim)
        self._leave(victim)
        victim.forced, victim.stopped_early = {}, False
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _too_big(self, problem: Problem, what: str) -> OutOfBlocksError:
        """The error for ``problem``, the only one running (or, to be placed, with none running): no
        other problem's state is touched when it is raised, so a server cancels it alone and goes on."""
        manager = self.core.policy.manager
        error = OutOfBlocksError(
            f"problem {problem.index} cannot {what} even alone: with {problem.num_particles} particles at step "
            f"{problem.step} (sweep {problem.sweep}) it needs more than the {manager.num_blocks} KV blocks "
            f"({size(manager.num_blocks * self.bytes_per_block)}) of the cache: raise kv_cache_memory or lower "
            f"num_particles / max_new_tokens")
        error.problem = problem
        return error

    # -- one iteration -------------------------------------------------------------
    def write(self) -> None:
        """One token for every writing particle: drawn, then fed to the policy."""
        core, table = self.core, self.core.table
        rows = np.flatnonzero(table.writing)
        if not len(rows):
            return
        tokens, feed, stopped = core.sample(rows)
        lane_of = table.problem[rows]
        self.generated += np.bincount(lane_of, minlength=len(self.generated))
        stops = np.bincount(lane_of[stopped], minlength=len(self.generated))
        for lane in np.flatnonzero(stops).tolist():
            self.lanes[lane].num_writing -= int(stops[lane])
        fed = [rows[feed], tokens[feed]]

        def without(victim: Problem) -> None:
            keep = ~np.isin(fed[0], victim.rows)
            fed[:] = fed[0][keep], fed[1][keep]

        self.with_room(lambda: core.feed(*fed), keep=self.running[0], on_preempt=without)
        finishing = rows[stopped]  # early stopping asks only where a particle finished
        for lane in np.unique(table.problem[finishing[table.finished[finishing]]]).tolist():
            problem = self.lanes[lane]  # None where the forward preempted it
            if problem is not None and problem.algorithm.settles(core, problem):
                self._stop_early(problem)

    # -- early stopping -----------------------------------------------------------------
    def _stop_early(self, problem: Problem) -> None:
        """Cancel the particles still writing: the round ends now and is the search's last."""
        table = self.core.table
        table.writing[problem.rows] = False
        problem.num_writing = 0
        problem.stopped_early = True

    def end_ready_rounds(self) -> list[Problem]:
        """End the round of every problem whose live particles have all ended their step, problems of
        one algorithm object together; returns those that finished."""
        ready = [p for p in self.running if p.num_writing == 0]
        by_algorithm: dict[int, list[Problem]] = {}
        for p in ready:
            by_algorithm.setdefault(id(p.algorithm), []).append(p)
        finished = []
        for group in by_algorithm.values():
            group = [p for p in group if p in self.running]  # an earlier group's scoring may have preempted some
            if group:
                finished += self.end_rounds(group)
        return finished

    # -- the end of a round ----------------------------------------------------------
    def end_rounds(self, ready: list[Problem]) -> list[Problem]:
        """Score, weigh, select and follow every problem in ``ready`` together; returns those
        that finished (evicted, results ready)."""
        core, algorithm = self.core, ready[0].algorithm
        cfg = algorithm.config
        batch = core.end_round(ready)
        if algorithm.scores:
            weighting = cfg.weighting
            if core.prm is None and weighting.prm:
                raise ValueError(f"{cfg.algorithm} needs a PRM")
            # the PRM's pool: make room, never by preempting the oldest ready problem
            self.with_room(lambda: core.score(batch, weighting), keep=batch.problems[0], on_preempt=batch.drop)
        batch.nodes = [book.commit(p, core.table, s) for p, s in zip(batch.problems, batch.steps, strict=True)]
        for p, nodes in zip(batch.problems, batch.nodes, strict=True):
            # also at the round's end: a stop string ends its particle there
            p.stopped_early = p.stopped_early or algorithm.settles(core, p)
            for node in nodes if p.stopped_early else ():
                p.tree[node].cancelled = not p.tree[node].finished
        batch.done = [p.step == cfg.max_steps - 1 or bool(p.finished.all()) or p.stopped_early for p in batch.problems]
        if batch.prm_output is not None:
            self._select(batch)
        return self._next_rounds(batch)

    def _select(self, batch: Round) -> None:
        """Weigh the scored batch in one fused call, let the algorithm choose, and follow its choice."""
        core, algorithm = self.core, batch.problems[0].algorithm
        cfg, n = algorithm.config, algorithm.config.num_particles
        params = cfg.resample_params(batch.reward_kind)

        def weigh_and_select():
            out, temperatures = algorithm.weigh(core, batch, params, self._resample_uniforms(cfg, batch.problems))
            return out, temperatures, algorithm.select(core, batch, out)

        # ancestor sampling's spliced futures may need room: a preempted problem redoes this round later
        out, temperatures, ancestors = self.with_room(weigh_and_select, keep=batch.problems[0],
                                                      on_preempt=batch.drop)
        rewards, weights = out.rewards.cpu().tolist(), out.weights.cpu()
        weight_list = weights.tolist()
        temperature_list = [None] * len(batch.problems) if temperatures is None else temperatures.tolist()
        confidences = None if batch.log_odds is None else torch.sigmoid(batch.log_odds).tolist()
        for b, (p, stepped, new) in enumerate(zip(batch.problems, batch.steps, batch.nodes, strict=True)):
            for (slot, _, _), node in zip(stepped, new, strict=True):
                tree_node, i = p.tree[node], b * n + slot
                tree_node.reward, tree_node.weight = rewards[i], weight_list[i]
                tree_node.temperature = temperature_list[b]
                tree_node.confidence = None if confidences is None else confidences[i]
        aggregates, num_steps = out.aggregates.cpu(), out.num_steps.cpu()
        for b, (p, chosen) in enumerate(zip(batch.problems, ancestors, strict=True)):
            part = slice(b * n, (b + 1) * n)
            if chosen is None:
                p.aggregates, p.num_steps, p.weights = aggregates[part], num_steps[part], weights[part]
            else:
                p.aggregates, p.num_steps = aggregates[part][chosen], num_steps[part][chosen]
                p.weights = torch.full((n,), 1.0 / n)  # the new generation weighs the same
                core.follow(p, chosen)

    def _next_rounds(self, batch: Round) -> list[Problem]:
        """Each problem of an ended batch leaves (its search is over) or begins its next round."""
        finished = []
        for p, done in zip(batch.problems, batch.done, strict=True):
            if done and not p.algorithm.end_sweep(self.core, p):
                self._leave(p)
                finished.append(p)
                continue
            if not done:
                p.step += 1
            self._begin_round(p)
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
