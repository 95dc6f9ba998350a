"""Qwen2 (Qwen2.5, Qwen2.5-Math) policies, and two PRMs on a Qwen2 trunk: Qwen2.5-Math-PRM's
class head and Skywork-o1-Open-PRM's value head."""

import torch
from torch import nn

from pf_engine.models.llama import DecoderModel, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biased q/k/v projections."""

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        return True, False


class Qwen2ForProcessRewardModel(nn.Module):
    """Qwen2 trunk and a 2-class head (hidden -> hidden -> ReLU -> 2) read at each step separator.

    ``score(hidden)`` gives [num_tokens, 2] logits [bad, good]; the step reward is
    softmax(logits)[1].
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, Qwen2ForCausalLM)
        num_labels = getattr(config, "num_labels", 2)
        if num_labels != 2:
            raise ValueError(f"a process reward model needs a 2-class head, the config has num_labels={num_labels}")
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(), nn.Linear(config.hidden_size, 2)
        )

    def tie_weights(self) -> None:
        pass

    def forward(self, input_ids, meta, backend, kv) -> torch.Tensor:
        return self.model(input_ids, meta, backend, kv)

    def class_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)


class Qwen2ForValueHeadPRM(nn.Module):
    """Qwen2 trunk and a scalar value head read at each step's last token; the step reward is
    sigmoid(value).

    Skywork-o1-Open-PRM-Qwen-2.5 checkpoints name the architecture ``Qwen2ForPrmModel`` and the
    head ``v_head.summary`` (Linear(hidden_size, 1), with a bias); the trunk is ``model.*`` as in
    Qwen2ForCausalLM. Their ``lm_head`` is not needed and not loaded.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, Qwen2ForCausalLM)
        self.v_head = nn.Module()
        self.v_head.summary = nn.Linear(config.hidden_size, 1)

    def tie_weights(self) -> None:
        pass

    def forward(self, input_ids, meta, backend, kv) -> torch.Tensor:
        return self.model(input_ids, meta, backend, kv)

    def step_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens] values before the sigmoid."""
        return self.v_head.summary(hidden).squeeze(-1)
