"""Process reward models scored incrementally on their own KV cache.

Each call extends every sequence by its newest step and a marker token, and
reads two logits at the marker; only the new tokens are prefilled. The logits
feed the fused resampling kernel (``reward="class_logits"`` or ``"token_logits"``).

- ``ClassHeadPRM``: Qwen2.5-Math-PRM style. The marker is the step separator
  (``<extra_0>``); a 2-class head on its hidden state gives [bad, good].
- ``TokenPairPRM``: Math-Shepherd style. The marker is the step tag; the LM's
  logits of a good and a bad token there give [good, bad].
"""

import torch

from pf_engine.runner import ModelRunner


class ClassHeadPRM:
    reward_kind = "class_logits"

    def __init__(self, runner: ModelRunner, separator_id: int):
        if not hasattr(runner.model, "class_logits"):
            raise ValueError(f"{type(runner.model).__name__} has no class head; use TokenPairPRM for a language model")
        self.runner = runner
        self.separator_id = separator_id

    def score(self, seq_ids, steps) -> torch.Tensor:
        """steps[i]: token ids of sequence i's newest step. Returns float32 [num_seqs, 2] logits [bad, good]."""
        new_tokens = [list(step) + [self.separator_id] for step in steps]
        hidden = self.runner.forward(seq_ids, new_tokens)
        with torch.inference_mode():
            return self.runner.model.class_logits(hidden[ModelRunner.last_token_index(new_tokens)]).float()


class TokenPairPRM:
    reward_kind = "token_logits"

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_id: int, bad_id: int):
        self.runner = runner
        self.step_tag_id = step_tag_id
        self.pair = torch.tensor([good_id, bad_id], device=runner.device)

    def score(self, seq_ids, steps) -> torch.Tensor:
        """steps[i]: token ids of sequence i's newest step. Returns float32 [num_seqs, 2] logits [good, bad]."""
        new_tokens = [list(step) + [self.step_tag_id] for step in steps]
        hidden = self.runner.forward(seq_ids, new_tokens)
        with torch.inference_mode():
            return self.runner.model.token_logits(hidden[ModelRunner.last_token_index(new_tokens)], self.pair).float()
