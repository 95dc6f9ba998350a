"""Process reward models scored incrementally on their own KV cache.

Each call extends every sequence by its newest step and a marker token, and
reads two logits at the marker; only the new tokens are prefilled. The logits
feed the fused resampling kernel (``reward="class_logits"`` or ``"token_logits"``).

- ``ClassHeadPRM``: Qwen2.5-Math-PRM style. The marker is the step separator
  (``<extra_0>``); a 2-class head on its hidden state gives [bad, good].
- ``TokenPairPRM``: Math-Shepherd style. The marker is the step tag; the LM's
  logits of a good and a bad token there give [good, bad].
- ``ValueHeadPRM``: Skywork-o1-Open-PRM style. The marker ends the step; the
  sigmoid of a scalar head there is the reward itself (``reward="reward"``).
"""

import torch

from pf_engine.runner import ModelRunner


class ModelPRM:
    """A PRM model on its own runner: a step's tokens and a marker token in, two logits at the marker out."""

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


class RulePRM:
    """A Python callable ``f(question, steps) -> reward in [0, 1]`` as a PRM (rule-based verifiers)."""

    reward_kind = "reward"

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"a rule PRM must be callable f(question, steps) -> float, got {type(fn).__name__}")
        self.fn = fn
