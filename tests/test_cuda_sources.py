"""Every CUDA source compiles for sm_80 and sm_90 (compile only: nothing CUDA runs here)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ["80", "90"]
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: install the CUDA toolkit (or put its "
                    "bin/ on PATH) to compile-check the .cu sources")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles(source, arch, tmp_path):
    obj = tmp_path / (source.name + ".o")
    cmd = [NVCC, "-c", str(source), "-o", str(obj), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0
