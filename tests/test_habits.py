"""Habits the code keeps (issue 30): the package passes ruff with the project's configuration
(pyproject.toml, [tool.ruff]: pyflakes and pycodestyle at 120 columns)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_passes_ruff():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "lrp_onnx"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
