"""The installed package: one import, its parts, and the self-check command."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pf_engine
from pf_engine import _native
from pf_engine.cli import main


def test_kernels_install_inside_the_package():
    import pf_engine.kernels.copy_blocks as mod

    assert mod.__name__ == "pf_engine.kernels.copy_blocks"


def test_native_module_is_built_and_reported():
    assert pf_engine.BlockManager is _native._C.BlockManager
    summary = _native.summary()
    assert summary["native block manager"] is True
    assert summary["CUDA extension"] == (_native._C_cuda is not None)


def test_selfcheck_passes(capsys):
    assert main(["selfcheck"]) == 0
    assert "self-check passed" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "pf-engine"
    assert script.exists(), f"the pf-engine command was not installed beside {sys.executable}"
    result = subprocess.run([str(script), "selfcheck"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "self-check passed" in result.stdout


def test_sdist_carries_every_native_source(tmp_path):
    # Headers and CUDA sources are not extension sources; without MANIFEST.in an
    # sdist leaves them out and `pip install` of it fails to compile.
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".vllm-venv", "out", "__pycache__", "*.so")
    shutil.copytree(root, tree, ignore=skip)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=tree,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    native = {str(p.relative_to(root)) for p in (root / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    assert native and native <= packed, f"missing from the sdist: {sorted(native - packed)}"
