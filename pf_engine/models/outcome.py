"""Outcome reward models: a causal decoder and a linear ``score`` head read at the last token,
as transformers saves ``LlamaForSequenceClassification`` and ``Qwen2ForSequenceClassification``
with one label (Skywork-Reward, for example). The answer's score is that one logit."""

import torch
from torch import nn

from pf_engine.models.linear import Linear
from pf_engine.models.llama import DecoderModel, LlamaForCausalLM
from pf_engine.models.qwen2 import Qwen2ForCausalLM


class LlamaForSequenceClassification(nn.Module):
    family = LlamaForCausalLM

    def __init__(self, config):
        super().__init__()
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"an outcome reward model needs one label (a scalar score), the config has num_labels="
                             f"{config.num_labels}")
        self.config = config
        self.model = DecoderModel(config, self.family)
        self.score = Linear(config.hidden_size, 1, bias=False)

    def tie_weights(self) -> None:
        pass

    def forward(self, input_ids, meta, backend, kv) -> torch.Tensor:
        return self.model(input_ids, meta, backend, kv)

    def outcome_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens] scores."""
        return self.score(hidden).squeeze(-1)


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    family = Qwen2ForCausalLM
