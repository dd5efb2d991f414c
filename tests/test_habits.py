"""Habits the code keeps: the package passes ruff's lint and is in ruff's format, with the project's
configuration (pyproject.toml, [tool.ruff]: pyflakes and pycodestyle at 120 columns), and passes
mypy (pyproject.toml, [tool.mypy]: the package's annotated functions, the public API among them)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_package_passes_ruff(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command, "--no-cache", "lrp_onnx"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_passes_mypy():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
