"""The installed package: a light import, what the self-check says this install runs, and packaging."""

import ctypes.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pf_engine import _native
from pf_engine.attention import get_backend
from pf_engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
# optional or heavy modules that `import pf_engine` must leave alone
NOT_ON_IMPORT = ("transformers", "triton", "flashinfer", "rich", "pf_engine.api")


def test_kernels_install_inside_the_package():
    import pf_engine.kernels.copy_blocks as mod

    assert mod.__name__ == "pf_engine.kernels.copy_blocks"


def test_import_is_light_and_the_native_module_works(tmp_path):
    code = ("import sys, pf_engine\n"
            "bm = pf_engine.BlockManager(8, 4)\n"
            "bm.allocate(5)\n"
            f"print(bm.num_free_blocks, *[m for m in {NOT_ON_IMPORT!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["6"], f"free blocks, then modules `import pf_engine` loaded: {result.stdout}"


@pytest.mark.skipif(torch.cuda.is_available() or ctypes.util.find_library("cuda") is not None
                    or os.path.exists("/dev/nvidiactl"),
                    reason="checks what a machine without a CUDA driver reports: runs there (CI's machines)")
def test_a_machine_without_cuda_reports_none():
    summary = _native.summary()
    assert summary["native block manager"] is True
    # without a driver setup.py skips the CUDA module unless PF_ENGINE_CUDA=1 forces it
    assert summary["CUDA device"] is False and summary["CUDA extension"] is False


def test_what_runs_where(monkeypatch):
    onednn = "oneDNN, prepacked weights" if torch.backends.mkldnn.is_available() else "torch linear"
    assert _native.kernels("cpu") == {"block copies": "torch indexing", "resampling step": "native CPU pass",
                                      "linear layers": onednn, "native CPU threads": _native.NATIVE_THREADS}
    assert _native.kernels("cpu", torch.float16)["linear layers"] == "torch linear"
    for built, copies in ((True, "CUDA extension"), (False, "Triton kernel")):
        monkeypatch.setattr(_native, "HAS_CUDA_EXT", built)
        assert _native.kernels("cuda:0", torch.bfloat16) == {"block copies": copies, "resampling step": "Triton kernel",
                                                            "linear layers": "torch linear"}


def test_native_passes_run_on_torchs_openmp_threads_where_torch_has_them():
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert _native.NATIVE_THREADS == ("torch's OpenMP threads" if openmp else "threads of their own")
    assert _native._C.uses_openmp() == openmp
    with pytest.raises(ValueError, match="three entry points or none"):
        _native._C.set_openmp(parallel=1, thread_num=0, num_threads=0)
    assert _native._C.uses_openmp() == openmp


def test_selfcheck_names_what_it_uses_and_passes(capsys):
    assert main(["selfcheck", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    shown = dict(re.findall(r"^  (\S.*?) {2,}(\S.*)$", out, re.M))
    assert set(_native.summary()) < set(shown), out
    assert shown["attention backend"] == get_backend("auto", "cpu").name == "torch"
    assert shown["block copies"] == "torch indexing" and shown["resampling step"] == "native CPU pass"
    assert "used on cpu:" in out and "self-check passed" in out


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "pf-engine"
    assert script.exists(), f"the pf-engine command was not installed beside {sys.executable}"
    result = subprocess.run([str(script), "selfcheck"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"used on {device}:" in result.stdout and "self-check passed" in result.stdout


def test_sdist_and_build_carry_every_file_without_warnings(tmp_path):
    # Headers and CUDA sources are not extension sources; without MANIFEST.in an
    # sdist leaves them out and `pip install` of it fails to compile.
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".vllm-venv", "out", "__pycache__", "*.so")
    shutil.copytree(ROOT, tree, ignore=skip)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=tree,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    native = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    assert native and native <= packed, f"missing from the sdist: {sorted(native - packed)}"
    assert "pf_engine/data/arithmetic.jsonl" in packed
    # What a wheel gets: the Python files and the demo's data, and no setuptools warning on the way
    # (a data folder left out of `packages` draws a long one).
    result = subprocess.run([sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path / "lib")],
                            cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert (tmp_path / "lib" / "pf_engine" / "data" / "arithmetic.jsonl").is_file()
    assert (tmp_path / "lib" / "pf_engine" / "kernels" / "copy_blocks.py").is_file()
