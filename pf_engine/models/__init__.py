"""Models loaded from local Hugging Face checkpoints (config.json + *.safetensors)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from pf_engine.models.granite import GraniteForCausalLM
from pf_engine.models.llama import LlamaForCausalLM
from pf_engine.models.outcome import LlamaForSequenceClassification, Qwen2ForSequenceClassification
from pf_engine.models.phi3 import Phi3ForCausalLM
from pf_engine.models.qwen2 import Qwen2ForCausalLM, Qwen2ForProcessRewardModel, Qwen2ForValueHeadPRM
from pf_engine.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2ForProcessRewardModel": Qwen2ForProcessRewardModel,
    "Qwen2ForPrmModel": Qwen2ForValueHeadPRM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
}


def load_config(path: str | Path):
    """The checkpoint's config, checked to describe a model pf_engine can run."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face checkpoint folder")
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path / 'config.json'} names architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise ValueError(f"{path / 'config.json'}: sliding-window attention ({window} tokens) is not supported")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    return files


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy every parameter from the checkpoint by name; a missing or misshapen tensor is an error."""
    params = dict(model.named_parameters())
    files = weight_files(path)
    loaded = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                param = params.get(name)
                if param is None:
                    continue
                shape = list(f.get_slice(name).get_shape())
                if shape != list(param.shape):
                    raise ValueError(f"{file}: tensor {name} has shape {shape}, the config expects {list(param.shape)}")
                with torch.no_grad():
                    param.copy_(f.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"weight {missing[0]}{more} not found in {', '.join(str(f) for f in files)}")


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """Build the checkpoint's model on ``device`` and load its weights.

    dtype defaults to float32 on the CPU and to the checkpoint's dtype elsewhere.
    Returns (model, config); the model is in eval mode without gradients.
    """
    path = Path(path)
    config = load_config(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else (getattr(config, "dtype", None) or torch.bfloat16)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = ARCHITECTURES[config.architectures[0]](config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage
    load_weights(model, path)
    model.eval().requires_grad_(False)
    return model, config
