"""Process reward models scored incrementally on their own KV cache.

Every kind of PRM answers one call, ``score(steps)``: a list of StepToScore (a
particle's new step, and where it stands) in, the output the fused resampling
kernel weighs out, one row per step: two logits (``reward_kind`` "class_logits"
or "token_logits") or the reward itself ("reward").

- ``RulePRM``: a Python callable ``f(question, steps) -> reward``.
- Model PRMs extend the particle's sequence on their own KV pool by the new step
  and a marker token, and read the head's output at the marker; only the new
  tokens are prefilled.

- ``ClassHeadPRM``: Qwen2.5-Math-PRM style. The marker is the step separator
  (``<extra_0>``); a 2-class head on its hidden state gives [bad, good].
- ``TokenPairPRM``: Math-Shepherd style. The marker is the step tag; the LM's
  logits of a good and a bad token there give [good, bad].
- ``ValueHeadPRM``: Skywork-o1-Open-PRM style. The marker ends the step; the
  sigmoid of a scalar head there is the reward itself (``reward="reward"``).
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from pf_engine.errors import OutOfBlocksError
from pf_engine.prm_format import PRMFormat
from pf_engine.runner import ModelRunner
from pf_engine.state import Problem


@dataclass(slots=True)  # not frozen: one is made per particle and step, and a frozen one costs 4x to make
class StepToScore:
    """A particle's new step: its text follows the particle's committed steps, then ``before``
    (ancestor sampling scores a reference's future steps spliced onto a candidate prefix)."""

    problem: Problem
    slot: int
    seq: int  # the particle's sequence on the PRM's pool (a fork of it, for a splice); -1 for a rule PRM
    text: str
    before: tuple[str, ...] = ()

    @property
    def index(self) -> int:
        """The step's place in the particle's path (0 first)."""
        return len(self.problem.path(self.slot)) + len(self.before)


class PRM(Protocol):
    reward_kind: str  # "reward", "class_logits" or "token_logits": how the fused step reads the output

    def prompt_ids(self, question: str) -> list[int] | None:
        """What the PRM reads before the first step on its own pool (None: it has no pool)."""

    def score(self, steps: list[StepToScore]) -> torch.Tensor:
        """float32 [len(steps)] rewards, or [len(steps), 2] logits, on the CPU."""


class ModelPRM:
    """A PRM model on its own runner: a step's tokens and a marker token in, the head's output at the
    marker out (two logits, or the reward for ``reward_kind`` "reward"). ``fmt`` and ``tokenizer``
    say how the PRM reads a question and a step."""

    reward_kind: str

    def __init__(self, runner: ModelRunner, marker_id: int, fmt: PRMFormat | None = None, tokenizer=None):
        self.runner = runner
        self.marker_id = marker_id
        self.fmt, self.tokenizer = fmt or PRMFormat(), tokenizer

    def prompt_ids(self, question: str) -> list[int]:
        """What the PRM reads before the first step."""
        return self.fmt.prompt_ids(self.tokenizer, question)

    def step_ids(self, index: int, text: str) -> list[int]:
        """What the PRM reads of step ``index`` (0 first) of a particle, before its marker."""
        return self.fmt.step_ids(self.tokenizer, index, text)

    def score(self, steps: list[StepToScore]) -> torch.Tensor:
        """Each step and the marker appended to its sequence (all or nothing; OutOfBlocksError leaves
        the sequences as they were); the tokens are added to the problems' ``prm_tokens``."""
        if not steps:
            return torch.zeros(0, *(() if self.reward_kind == "reward" else (2,)))
        ids = [self.step_ids(s.index, s.text) for s in steps]
        out = self.score_ids([s.seq for s in steps], ids).cpu()
        for s, step in zip(steps, ids, strict=True):
            s.problem.prm_tokens += len(step) + 1
        return out

    def score_ids(self, seq_ids, steps) -> torch.Tensor:
        """steps[i]: token ids of sequence i's newest step. Returns float32 [num_seqs, 2] logits, or
        [num_seqs] rewards for ``reward_kind`` "reward"."""
        new_tokens = [list(step) + [self.marker_id] for step in steps]
        hidden = self.runner.forward(seq_ids, new_tokens)
        with torch.inference_mode():
            return self.head(hidden[ModelRunner.last_token_index(new_tokens)]).float()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassHeadPRM(ModelPRM):
    """Logits [bad, good] of the class head at the step separator."""

    reward_kind = "class_logits"

    def __init__(self, runner: ModelRunner, separator_id: int, fmt: PRMFormat | None = None, tokenizer=None):
        if not hasattr(runner.model, "class_logits"):
            raise ValueError(f"{type(runner.model).__name__} has no class head; use TokenPairPRM for a language model")
        super().__init__(runner, separator_id, fmt, tokenizer)

    def head(self, hidden):
        return self.runner.model.class_logits(hidden)


class TokenPairPRM(ModelPRM):
    """The LM's logits [good, bad] of two tokens at the step tag."""

    reward_kind = "token_logits"

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_id: int, bad_id: int,
                 fmt: PRMFormat | None = None, tokenizer=None):
        super().__init__(runner, step_tag_id, fmt, tokenizer)
        self.pair = torch.tensor([good_id, bad_id], device=runner.device)

    def head(self, hidden):
        return self.runner.model.token_logits(hidden, self.pair)


class ValueHeadPRM(ModelPRM):
    """sigmoid of the value head at the step's end: rewards in [0, 1]."""

    reward_kind = "reward"

    def __init__(self, runner: ModelRunner, marker_id: int, fmt: PRMFormat | None = None, tokenizer=None):
        if not hasattr(runner.model, "step_values"):
            raise ValueError(f"{type(runner.model).__name__} has no value head")
        super().__init__(runner, marker_id, fmt, tokenizer)

    def head(self, hidden):
        return torch.sigmoid(self.runner.model.step_values(hidden).float())


class OutcomeRM:
    """An outcome reward model, scored once per finished particle: the question and the whole
    answer as a conversation (user, assistant) of its tokenizer's chat template, read at the
    last token. A problem's particles share the conversation's opening (prefilled once, forked).
    Every sequence made here is freed before :meth:`score` returns or raises."""

    _SENTINEL = "\x00answer\x00"

    def __init__(self, runner: ModelRunner, tokenizer):
        if not hasattr(runner.model, "outcome_scores"):
            raise ValueError(f"{type(runner.model).__name__} is not a sequence-classification (outcome) reward model")
        self.runner, self.tokenizer = runner, tokenizer

    def texts(self, question: str) -> tuple[str, str]:
        """What comes before and after the answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            return question + "\n", ""
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": self._SENTINEL}]
        before, after = self.tokenizer.apply_chat_template(turns, tokenize=False).split(self._SENTINEL)
        return before, after

    def token_ids(self, question: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
        before, after = self.texts(question)
        prompt = self.tokenizer.encode(before, add_special_tokens=not getattr(self.tokenizer, "chat_template", None))
        return prompt, [self.tokenizer.encode(a + after, add_special_tokens=False) for a in answers]

    def score(self, question: str, answers: list[str]) -> list[float]:
        prompt, answer_ids = self.token_ids(question, answers)
        bm = self.runner.manager
        root = bm.allocate(0)
        try:
            opening = self.runner.forward([root], [prompt])[-1:]
            written = [i for i, ids in enumerate(answer_ids) if ids]
            scores = self._score(root, [answer_ids[i] for i in written]) if written else []
            with torch.inference_mode():  # an empty answer with nothing after it: read where it would start
                empty = self.runner.model.outcome_scores(opening).float().item()
            out = [empty] * len(answers)
            for i, score in zip(written, scores, strict=True):
                out[i] = score
            return out
        finally:
            bm.free(root)

    def _score(self, root: int, answer_ids: list[list[int]]) -> list[float]:
        """All answers at once, each on a fork of ``root`` (freed before returning); halves where
        the cache cannot hold them together."""
        bm = self.runner.manager
        seqs = []
        try:
            for _ in answer_ids:
                seqs.append(bm.fork(root))
            hidden = self.runner.forward(seqs, answer_ids)[ModelRunner.last_token_index(answer_ids)]
            with torch.inference_mode():
                return self.runner.model.outcome_scores(hidden).float().tolist()
        except OutOfBlocksError:
            if len(answer_ids) == 1:
                raise OutOfBlocksError(f"the outcome reward model's KV cache ({bm.num_blocks} blocks) cannot hold "
                                       f"the question and one answer of {len(answer_ids[0])} tokens: raise "
                                       "kv_cache_memory") from None
        finally:
            for seq in seqs:
                bm.free(seq)
        half = len(answer_ids) // 2
        return self._score(root, answer_ids[:half]) + self._score(root, answer_ids[half:])


class RulePRM:
    """A Python callable ``f(question, steps) -> reward in [0, 1]`` as a PRM (rule-based verifiers)."""

    reward_kind = "reward"

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"a rule PRM must be callable f(question, steps) -> float, got {type(fn).__name__}")
        self.fn = fn

    def prompt_ids(self, question: str) -> None:
        """A rule reads text: it has no prompt of its own, and no pool."""
        return None

    def score(self, steps: list[StepToScore]) -> torch.Tensor:
        rewards = [float(self.fn(s.problem.question, s.problem.steps(s.slot) + [*s.before, s.text])) for s in steps]
        return torch.tensor(rewards, dtype=torch.float32)
