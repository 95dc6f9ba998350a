"""The step loop's parts: start problems, expand every live particle by one step,
score the step, resample; the policy's and the PRM's KV caches fork together.

Every draw is keyed by (problem, round, slot, token in step) as pf_engine.philox
lays it out, so a particle's tokens do not depend on how problems were batched.
"""

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pf_engine.answers import boxed_answer
from pf_engine.philox import RESAMPLE_TOKEN, philox_key, philox_uniform, search_uniforms
from pf_engine.prm import ModelPRM, RulePRM
from pf_engine.resample import ResampleOutput, resample
from pf_engine.runner import ModelRunner
from pf_engine.sampling import SamplingParams, filtered_logits, sample


@dataclass
class Particle:
    problem: int  # index of its problem in the engine's current batch
    slot: int  # position among its problem's particles
    seq_id: int  # policy sequence
    prm_seq_id: int | None  # PRM sequence (model PRMs only)
    logits: torch.Tensor  # [vocab] float32 logits of the next token
    steps: list[str] = field(default_factory=list)
    step_ids: list[list[int]] = field(default_factory=list)  # token ids of each step
    step_tokens: list[int] = field(default_factory=list)  # the step being written
    num_tokens: int = 0  # generated so far
    node: int = -1  # tree node of its newest step
    finished: bool = False
    forced: list[int] | None = None  # particle Gibbs: the next step is replayed from these tokens, not sampled
    forced_finishes: bool = False  # ... and the particle finishes after it


@dataclass
class TreeNode:
    """One step of one particle, alive or not: the search tree is the list of these."""

    node: int
    problem: int
    parent: int  # -1 for a first step
    depth: int  # 0 for a first step
    text: str
    reward: float | None = None
    weight: float | None = None
    num_children: int = 0  # copies that survived resampling; 0 for a dead branch, until the end
    finished: bool = False
    iteration: int = 0  # particle Gibbs: the sweep that wrote it
    reference: bool = False  # particle Gibbs: replayed from the reference path, not sampled


def _timed(phase: str):
    """Adds the wall time of each call to ``self.stats["seconds_<phase>"]``."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self.stats[f"seconds_{phase}"] += time.perf_counter() - start

        return timed

    return wrap


class ParticleEngine:
    """Runs particles of many problems as one batch on a policy (and optional PRM) runner.

    prm: None, a RulePRM, or a ModelPRM (ClassHeadPRM, TokenPairPRM) on its own runner.
    """

    def __init__(self, policy: ModelRunner, tokenizer, prm=None, prm_tokenizer=None):
        self.policy, self.tokenizer = policy, tokenizer
        self.prm, self.prm_tokenizer = prm, prm_tokenizer
        self.prm_runner = prm.runner if isinstance(prm, ModelPRM) else None  # a model PRM's own cache
        self.eos_ids = set(_as_list(getattr(policy.model.config, "eos_token_id", None)))
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.stats = {"tokens_generated": 0, "prm_tokens": 0, "ancestor_tokens": 0, "peak_blocks": 0,
                      "peak_prm_blocks": 0,
                      "seconds_prefill": 0.0, "seconds_expand": 0.0, "seconds_score": 0.0, "seconds_resample": 0.0,
                      "seconds_ancestors": 0.0}

    # -- prompts ---------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        return _chat_prompt(self.tokenizer, question)

    def prm_prompt_ids(self, question: str) -> list[int]:
        """What a model PRM reads before the first step."""
        return _chat_prompt(self.prm_tokenizer, question)

    @_timed("prefill")
    def start(self, questions: list[str], num_particles: int) -> list[Particle]:
        """Prefill each prompt once (one batched forward), then fork it into ``num_particles``."""
        prompts = [self.prompt_ids(q) for q in questions]
        roots = [self.policy.manager.allocate(0) for _ in prompts]
        logits = self.policy.logits(self.policy.forward(roots, prompts)[ModelRunner.last_token_index(prompts)])
        prm_roots = [None] * len(prompts)
        if self.prm_runner is not None:
            prm_prompts = [self.prm_prompt_ids(q) for q in questions]
            prm_roots = [self.prm_runner.manager.allocate(0) for _ in prm_prompts]
            self.prm_runner.forward(prm_roots, prm_prompts)
            self.stats["prm_tokens"] += sum(map(len, prm_prompts))
        particles = []
        for b, (root, prm_root) in enumerate(zip(roots, prm_roots, strict=True)):
            for slot in range(num_particles):
                seq = root if slot == 0 else self.policy.manager.fork(root)
                prm_seq = prm_root if slot == 0 or prm_root is None else self.prm_runner.manager.fork(prm_root)
                particles.append(Particle(b, slot, seq, prm_seq, logits[b]))
        self._note_blocks()
        return particles

    # -- expand ----------------------------------------------------------------
    @_timed("expand")
    def expand(self, particles: list[Particle], keys: list[int], round_: int, sampling: SamplingParams, seed: int,
               delimiter: str, max_step_tokens: int, max_new_tokens: int, stop_at_boxed: bool) -> list[Particle]:
        """Decode one step for every unfinished particle; returns those that wrote a step.

        A particle with ``forced`` tokens replays them as its step (particle Gibbs'
        reference): the step ends after them whatever the delimiter and the token
        caps say, and EOS or a boxed answer among them still finish it.
        """
        active = [p for p in particles if not p.finished]
        for p in active:
            p.step_tokens = []
        writing = active
        while writing:
            logits = torch.stack([p.logits for p in writing])
            offsets = philox_key([keys[p.problem] for p in writing], round_, [p.slot for p in writing],
                                 [len(p.step_tokens) for p in writing])
            tokens = sample(logits, sampling, uniforms=philox_uniform(seed, offsets)).tolist()
            feed, still = [], []
            for p, token in zip(writing, tokens, strict=True):
                if p.forced is not None:
                    token = p.forced[len(p.step_tokens)]
                p.step_tokens.append(token)
                p.num_tokens += 1
                if token in self.eos_ids:
                    p.finished = True
                    continue
                text = self.tokenizer.decode(p.step_tokens, skip_special_tokens=True)
                if stop_at_boxed and boxed_answer(text) is not None:
                    p.finished = True
                    continue
                if p.forced is not None:
                    step_done = len(p.step_tokens) == len(p.forced)
                    if step_done and p.forced_finishes:
                        p.finished = True
                        continue
                elif p.num_tokens >= max_new_tokens:
                    p.finished = True
                    continue
                else:
                    step_done = delimiter in text or len(p.step_tokens) >= max_step_tokens
                feed.append(p)
                if not step_done:
                    still.append(p)
            self.stats["tokens_generated"] += len(writing)
            if feed:
                hidden = self.policy.forward([p.seq_id for p in feed], [[p.step_tokens[-1]] for p in feed])
                for p, row in zip(feed, self.policy.logits(hidden), strict=True):
                    p.logits = row
                self._note_blocks()
            writing = still
        for p in active:
            p.steps.append(self.tokenizer.decode(p.step_tokens, skip_special_tokens=True))
            p.step_ids.append(p.step_tokens)
            p.forced, p.forced_finishes = None, False
        return active

    # -- score -----------------------------------------------------------------
    @_timed("score")
    def score(self, questions: list[str], particles: list[Particle],
              scored: list[Particle]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """PRM output of the newest step of each particle in ``scored``.

        Returns (prm_output for every particle, live mask, reward kind); rows of
        particles not scored hold zeros and are not read by the kernel.
        """
        if self.prm is None:
            raise ValueError("this search needs a PRM: pass prm= to the Engine")
        index = {id(p): i for i, p in enumerate(particles)}
        rows = torch.tensor([index[id(p)] for p in scored], dtype=torch.long)
        live = torch.zeros(len(particles), dtype=torch.bool)
        live[rows] = True
        if isinstance(self.prm, RulePRM):
            out = torch.zeros(len(particles))
            rewards = [float(self.prm.fn(questions[p.problem], list(p.steps))) for p in scored]
            out[rows] = torch.tensor(rewards, dtype=torch.float32)
            return out, live, "reward"
        out = torch.zeros(len(particles), 2)
        if scored:
            steps = [self.prm_tokenizer.encode(p.steps[-1], add_special_tokens=False) for p in scored]
            out[rows] = self.prm.score([p.prm_seq_id for p in scored], steps).cpu()
            self.stats["prm_tokens"] += sum(len(s) + 1 for s in steps)
            self._note_blocks()
        return out, live, self.prm.reward_kind

    # -- particle Gibbs ----------------------------------------------------------
    @_timed("ancestors")
    def splice(self, questions: list[str], candidates: list[Particle], futures: list[list[list[int]]],
               future_texts: list[list[str]], sampling: SamplingParams) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """How each candidate prefix would carry a reference path's future (ancestor sampling).

        ``futures[i]`` / ``future_texts[i]``: token ids / texts of the steps that
        follow candidate ``i``'s prefix on the reference path (at least one). Returns

        - the log-likelihood of each future under the sampling distribution given
          its candidate's prefix: float64 [num_candidates];
        - for k = 0, 1, ...: the PRM output of the k-th future step of the
          candidates whose future has one (rows in candidate order), as ``score``
          gives it (rewards [m] for a rule PRM, logits [m, 2] for a model PRM).

        The candidates' sequences are forked, extended and freed: nothing stays.
        """
        loglik = torch.zeros(len(candidates), dtype=torch.float64)
        tokens = [[t for step in future for t in step] for future in futures]
        forks = [self.policy.manager.fork(c.seq_id) for c in candidates]
        try:
            hidden = self.policy.forward(forks, tokens)
            self.stats["ancestor_tokens"] += sum(map(len, tokens))
            self._note_blocks()
            start = 0
            for i, (c, ids) in enumerate(zip(candidates, tokens, strict=True)):
                rows = hidden[start:start + len(ids) - 1]  # the last token predicts nothing we need
                start += len(ids)
                logits = torch.cat([c.logits[None], self.policy.logits(rows)])
                logp = torch.log_softmax(filtered_logits(logits, sampling), dim=-1)
                loglik[i] = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).double().sum()
        finally:
            for seq in forks:
                self.policy.manager.free(seq)
        return loglik, self._splice_prm(questions, candidates, future_texts)

    def _splice_prm(self, questions, candidates, future_texts) -> list[torch.Tensor]:
        depth = max(map(len, future_texts))
        if isinstance(self.prm, RulePRM):
            return [torch.tensor([float(self.prm.fn(questions[c.problem], c.steps + texts[:k + 1]))
                                  for c, texts in zip(candidates, future_texts, strict=True) if len(texts) > k],
                                 dtype=torch.float32) for k in range(depth)]
        forks = [self.prm_runner.manager.fork(c.prm_seq_id) for c in candidates]
        try:
            outputs = []
            for k in range(depth):
                rows = [i for i, texts in enumerate(future_texts) if len(texts) > k]
                steps = [self.prm_tokenizer.encode(future_texts[i][k], add_special_tokens=False) for i in rows]
                outputs.append(self.prm.score([forks[i] for i in rows], steps).cpu())
                self.stats["prm_tokens"] += sum(len(s) + 1 for s in steps)
            return outputs
        finally:
            for seq in forks:
                self.prm_runner.manager.free(seq)

    # -- resample --------------------------------------------------------------
    @_timed("resample")
    def weigh(self, particles: list[Particle], keys: list[int], round_: int, prm_output, live, aggregates,
              num_steps, params, seed: int, num_particles: int) -> ResampleOutput:
        """Rewards, weights, ESS and ancestors for all problems in one fused call."""
        num_problems = len(particles) // num_particles
        seg = np.arange(num_problems + 1) * num_particles
        slots = torch.arange(len(particles)) % num_particles
        problems = torch.tensor(keys, dtype=torch.int64).repeat_interleave(num_particles)
        uniforms = search_uniforms(seed, problems, round_, slots, RESAMPLE_TOKEN)
        device = self.policy.device
        return resample(seg, prm_output.to(device), live.to(device), aggregates.to(device), num_steps.to(device),
                        params, uniforms=uniforms.to(device))

    @_timed("resample")
    def follow(self, particles: list[Particle], ancestors, num_particles: int) -> list[Particle]:
        """Replace the particles by copies of their chosen ancestors: one resample per block manager."""
        ancestors = np.asarray(ancestors)
        new_ids = self.policy.manager.resample([p.seq_id for p in particles], ancestors).tolist()
        new_prm_ids = [None] * len(particles)
        if self.prm_runner is not None:
            new_prm_ids = self.prm_runner.manager.resample([p.prm_seq_id for p in particles], ancestors).tolist()
        children = []
        for j, (a, seq, prm_seq) in enumerate(zip(ancestors.tolist(), new_ids, new_prm_ids, strict=True)):
            parent = particles[a]
            children.append(Particle(parent.problem, j % num_particles, seq, prm_seq, parent.logits,
                                     list(parent.steps), list(parent.step_ids), [], parent.num_tokens, parent.node,
                                     parent.finished))
        return children

    def release(self, particles: list[Particle]) -> None:
        for p in particles:
            self.policy.manager.free(p.seq_id)
            if p.prm_seq_id is not None:
                self.prm_runner.manager.free(p.prm_seq_id)

    def _note_blocks(self) -> None:
        for key, runner in (("peak_blocks", self.policy), ("peak_prm_blocks", self.prm_runner)):
            if runner is not None:
                used = runner.manager.num_blocks - runner.manager.num_free_blocks
                self.stats[key] = max(self.stats[key], used)


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _chat_prompt(tokenizer, question: str) -> list[int]:
    """The question as a user turn of the tokenizer's chat template (plain text where it has none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(question + "\n", add_special_tokens=True)
