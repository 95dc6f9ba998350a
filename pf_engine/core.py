"""The engine's phases over its pools: place a problem's particles (from its prompt, or
rebuilt from its search tree after a preemption), draw and feed one token for every writing
particle, end a problem's round, score the new steps, weigh, and follow the chosen ancestors.

Who does what::

    Core                  the phases below, over every pool alike; statistics
      pools               pf_engine.pool: the policy's KV pool, then a model PRM's
      writer              pf_engine.writer: the rows of the round in flight, keyed draws,
                          step ends, forced tokens, stop strings
      prm                 pf_engine.prm: any PRM behind one score(steps) call
    pf_engine.book        commit and rollback of a round on the tree
    pf_engine.scheduler   which problems run, preemption, the order of the phases

Every draw is keyed by (problem, round, slot, token in step) as pf_engine.philox lays it
out, so a particle's tokens depend neither on batching nor on preemption.
"""

import contextlib
import functools
import time

import numpy as np
import torch

from pf_engine import book
from pf_engine.confidence import Weighting, combined_rewards
from pf_engine.pool import Pool, PRMPool
from pf_engine.prm import ModelPRM, StepToScore
from pf_engine.resample import ResampleOutput, ResampleParams, resample
from pf_engine.runner import ModelRunner
from pf_engine.state import Problem, Round
from pf_engine.writer import StepWriter

# Peaks of blocks in use and of the blocks the particles would hold unshared, for the policy's and a model
# PRM's pools (Core.stats). Engine.stream resets them at the start of each call; a server's
# long-lived scheduler never does, so there they are the server's since start-up.
PEAK_STATS = ("peak_blocks", "peak_prm_blocks", "peak_unshared_blocks", "peak_unshared_prm_blocks")


def _timed(phase: str):
    """Adds the wall time of each call to ``self.stats["seconds_<phase>"]``."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            with self.timing(phase):
                return fn(self, *args, **kwargs)

        return timed

    return wrap


class Core:
    """Runs the particles of many problems on a policy runner, and a PRM: None, a RulePRM, or a
    ModelPRM (ClassHeadPRM, TokenPairPRM, ValueHeadPRM) on its own runner and pool."""

    def __init__(self, policy: ModelRunner, tokenizer, prm=None):
        self.policy, self.tokenizer, self.prm = policy, tokenizer, prm
        self.pools: list[Pool] = [Pool(0, policy)]
        if isinstance(prm, ModelPRM):
            self.pools.append(PRMPool(1, prm))
        self.eos_ids = set(_as_list(getattr(policy.model.config, "eos_token_id", None)))
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.writer = StepWriter(tokenizer, self.eos_ids, policy.vocab_size)
        # peaks since they were last reset (PEAK_STATS); forwards and sequences fed for occupancy; seconds per phase
        self.stats = dict.fromkeys(PEAK_STATS, 0) | {
            "decode_forwards": 0, "decode_sequences": 0, "seconds_prefill": 0.0, "seconds_decode": 0.0,
            "seconds_score": 0.0, "seconds_resample": 0.0, "seconds_ancestors": 0.0}

    @property
    def table(self):
        return self.writer.table

    @property
    def managers(self) -> list:
        return [pool.manager for pool in self.pools]

    @contextlib.contextmanager
    def timing(self, phase: str):
        """Adds the block's wall time to ``stats["seconds_<phase>"]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[f"seconds_{phase}"] += time.perf_counter() - start

    # -- set-up ----------------------------------------------------------------
    def prompt_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
        """What the policy reads before its first step: the question as a user turn of its chat
        template, after a system turn where ``system_prompt`` is given."""
        return _chat_prompt(self.tokenizer, question, system_prompt)

    def prm_prompt_ids(self, question: str) -> list[int] | None:
        """What a model PRM reads before the first step (None without one)."""
        return self.prm.prompt_ids(question) if self.prm is not None else None

    def begin(self) -> None:
        """Fresh rows, for a scheduler that starts with nothing placed."""
        self.writer.begin(self.policy.model.config.hidden_size, self.policy.kv_cache.kv.dtype, self.policy.device,
                          len(self.pools))

    # -- placing and evicting problems -------------------------------------------
    @_timed("prefill")
    def place(self, problem: Problem) -> None:
        """Give ``problem`` rows and a sequence per particle on every pool: prefill its prompt and fork
        it, or, for a preempted problem, rebuild each particle from its tree (shared prefixes once,
        then forks).

        Raises OutOfBlocksError with nothing allocated when a pool is too small.
        """
        created: list[tuple[object, int]] = []  # (manager, seq) made here, freed again on failure
        try:
            placed = [pool.place(problem, created) for pool in self.pools]
            problem.root_hidden = placed[0][2]  # the policy's: what the first draws read
            self.writer.take(problem, [seqs for seqs, _, _ in placed], placed[0][1])
        except BaseException:
            for manager, seq in reversed(created):
                manager.free(seq)
            problem.roots = [None] * len(problem.roots)
            problem.root_hidden = None
            if problem.rows is not None:
                self.writer.give_back(problem)
            raise
        self.note_blocks()

    def blocks_to_place(self, problem: Problem) -> list[int]:
        """Blocks :meth:`place` takes (about) on each pool."""
        return [pool.blocks_to_place(problem) for pool in self.pools]

    def evict(self, problem: Problem) -> None:
        """Free every sequence and row of a placed problem (preemption, or the end of its search)."""
        if problem.rows is None:
            return
        for pool in self.pools:
            pool.evict(self.table, problem)
        self.writer.give_back(problem)
        problem.root_hidden = None
        problem.num_writing = 0

    # -- a round -----------------------------------------------------------------
    def begin_round(self, problem: Problem) -> None:
        self.writer.begin_round(problem)

    @_timed("decode")
    def sample(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw the next token of every writing row and apply the step-end rules (StepWriter.write)."""
        return self.writer.write(rows, self.policy.logits(self.table.hidden[torch.from_numpy(rows)]))

    @_timed("decode")
    def feed(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Run the model on each row's newest token; keep its hidden state for the next draw."""
        if len(rows) == 0:
            return
        hidden = self.policy.run(self.table.seq_ids[rows, 0], np.ones(len(rows), dtype=np.int64), tokens)
        self.table.hidden[torch.from_numpy(rows)] = hidden
        self.stats["decode_forwards"] += 1
        self.stats["decode_sequences"] += len(rows)
        self.note_blocks()

    def end_round(self, problems: list[Problem]) -> Round:
        return self.writer.end_round(problems)

    @_timed("score")
    def score(self, batch: Round, weighting: Weighting) -> None:
        """The step reward of every particle that wrote a step, into ``batch.prm_output`` (rows of the
        others hold zeros and are not read), ``live`` and ``reward_kind``: the PRM's output, the
        policy's confidence in the step (``batch.log_odds``), or both, as ``weighting`` says
        (pf_engine.confidence). A model PRM appends each step and a marker to the particle's
        sequence on its pool (all or nothing)."""
        problems, steps = batch.problems, batch.steps
        n = problems[0].num_particles
        index = torch.tensor([b * n + slot for b, stepped in enumerate(steps) for slot, _, _ in stepped],
                             dtype=torch.long)
        live = torch.zeros(len(problems) * n, dtype=torch.bool)
        live[index] = True
        out, kind = self._prm_output(problems, steps, index) if weighting.prm else (None, None)
        if weighting.signal is not None:
            out, kind = combined_rewards(out, kind, batch.log_odds, weighting.exponent, live, n), "reward"
        batch.prm_output, batch.live, batch.reward_kind = out, live, kind

    def _prm_output(self, problems: list[Problem], steps: list, index: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The PRM's output for each problem's ``steps`` ((slot, ids, text); at ``index``), and its kind."""
        n = problems[0].num_particles
        column = self.table.seq_ids[:, self.pools[-1].index]  # a model PRM's pool (a rule PRM reads no sequence)
        to_score = [StepToScore(p, slot, seq, text) for p, stepped in zip(problems, steps, strict=True)
                    for (slot, _, text), seq in zip(stepped, column[p.rows[[s for s, _, _ in stepped]]].tolist(),
                                                    strict=True)]
        out = torch.zeros(len(problems) * n, *(() if self.prm.reward_kind == "reward" else (2,)))
        if to_score:
            out[index] = self.prm.score(to_score)
            self.note_blocks()
        return out, self.prm.reward_kind

    @_timed("resample")
    def weigh(self, batch: Round, params: ResampleParams, uniforms: torch.Tensor,
              temperatures: torch.Tensor | None = None) -> ResampleOutput:
        """Rewards, weights, ESS and ancestors for every problem of a scored batch in one fused call
        (each problem at its own weight temperature too, where ``temperatures`` is given)."""
        n = batch.problems[0].num_particles
        seg = np.arange(len(batch.problems) + 1) * n
        aggregates = torch.cat([p.aggregates for p in batch.problems])
        num_steps = torch.cat([p.num_steps for p in batch.problems])
        device = self.policy.device
        return resample(seg, batch.prm_output.to(device), batch.live.to(device), aggregates.to(device),
                        num_steps.to(device), params, uniforms=uniforms.to(device),
                        temperatures=None if temperatures is None else temperatures.to(device))

    @_timed("resample")
    def follow(self, problem: Problem, ancestors: np.ndarray) -> None:
        """Slot ``j`` becomes a copy of slot ``ancestors[j]``: one resample per pool; the particles'
        durable state and hidden rows are gathered the same way."""
        r, rows = self.table, problem.rows
        for pool in self.pools:
            pool.follow(r, problem, ancestors)
        r.hidden[torch.from_numpy(rows)] = r.hidden[torch.from_numpy(rows[ancestors])]
        book.follow(problem, ancestors)

    def restart(self, problem: Problem) -> None:
        """Every particle back at the prompt on every pool, for a new sweep."""
        for pool in self.pools:
            pool.restart(self.table, problem)
        self.table.hidden[torch.from_numpy(problem.rows)] = problem.root_hidden
        problem.sweep += 1
        problem.new_sweep()

    def note_blocks(self) -> None:
        for pool in self.pools:
            pool.note_blocks(self.stats, self.table)


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _chat_prompt(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """The question as a user turn of the tokenizer's chat template (plain text where it has none)."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return chat_ids(tokenizer, turns + [{"role": "user", "content": question}])


def chat_ids(tokenizer, turns: list[dict]) -> list[int]:
    """A conversation as the tokenizer's chat template renders it, ready for the assistant's turn; without a
    template, the turns' texts a blank line apart."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode("\n\n".join(t["content"] for t in turns) + "\n", add_special_tokens=True)
