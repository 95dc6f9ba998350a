"""The installed package: one import, its parts, and the self-check command."""

import subprocess
import sys

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


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "pf_engine.cli", "selfcheck"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "self-check passed" in result.stdout
