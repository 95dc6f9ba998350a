"""Process reward models scored incrementally on their own KV cache.

Each call extends every sequence by its newest step and a marker token, and
reads the head's output at the marker; only the new tokens are prefilled. That
output feeds the fused resampling kernel: two logits (``reward="class_logits"``
or ``"token_logits"``) or the reward itself (``reward="reward"``).

- ``ClassHeadPRM``: Qwen2.5-Math-PRM style. The marker is the step separator
  (``<extra_0>``); a 2-class head on its hidden state gives [bad, good].
- ``TokenPairPRM``: Math-Shepherd style. The marker is the step tag; the LM's
  logits of a good and a bad token there give [good, bad].
- ``ValueHeadPRM``: Skywork-o1-Open-PRM style. The marker ends the step; the
  sigmoid of a scalar head there is the reward itself (``reward="reward"``).
"""

import torch

from pf_engine.errors import OutOfBlocksError
from pf_engine.runner import ModelRunner


class ModelPRM:
    """A PRM model on its own runner: a step's tokens and a marker token in, the head's output at the
    marker out (two logits, or the reward for ``reward_kind`` "reward")."""

    reward_kind: str

    def __init__(self, runner: ModelRunner, marker_id: int):
        self.runner = runner
        self.marker_id = marker_id

    def score(self, seq_ids, steps) -> torch.Tensor:
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

    def __init__(self, runner: ModelRunner, separator_id: int):
        if not hasattr(runner.model, "class_logits"):
            raise ValueError(f"{type(runner.model).__name__} has no class head; use TokenPairPRM for a language model")
        super().__init__(runner, separator_id)

    def head(self, hidden):
        return self.runner.model.class_logits(hidden)


class TokenPairPRM(ModelPRM):
    """The LM's logits [good, bad] of two tokens at the step tag."""

    reward_kind = "token_logits"

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_id: int, bad_id: int):
        super().__init__(runner, step_tag_id)
        self.pair = torch.tensor([good_id, bad_id], device=runner.device)

    def head(self, hidden):
        return self.runner.model.token_logits(hidden, self.pair)


class ValueHeadPRM(ModelPRM):
    """sigmoid of the value head at the step's end: rewards in [0, 1]."""

    reward_kind = "reward"

    def __init__(self, runner: ModelRunner, marker_id: int):
        if not hasattr(runner.model, "step_values"):
            raise ValueError(f"{type(runner.model).__name__} has no value head")
        super().__init__(runner, marker_id)

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
