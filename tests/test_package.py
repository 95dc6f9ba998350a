"""The installed package: one import, its parts, and the self-check command."""

import subprocess
import sys
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
