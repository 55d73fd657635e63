"""The installed commands of pyproject.toml's [project.scripts] are the checkout's scripts."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT


def test_each_installed_command_runs_its_entry_point_with_one_line_errors():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"cifar10-train", "cifar10-test", "cifar10-predict", "cifar10-export"}
    for name, target in scripts.items():
        module, function = target.split(":")
        # What the console script pip writes does: sys.exit of the function's exit code.
        code = f"import sys; sys.argv = [{name!r}, '--no-such-flag']; from {module} import {function}; sys.exit({function}())"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"{name}: error: unrecognized arguments: --no-such-flag"), result.stderr
        assert result.stderr.count("\n") == 1
