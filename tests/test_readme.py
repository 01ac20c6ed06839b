"""The README's two set-up commands stay true: CI runs the test command, the main job runs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def readme_commands():
    """The ``$ `` command lines of the README, in order."""
    text = (ROOT / "README.md").read_text()
    return [m.group(1).strip() for m in re.finditer(r"^\s+\$ (.+)$", text, re.M)]


def test_readme_starts_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) >= 2
    assert cmds[0].startswith("pip install") and "replay " in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_main_command_runs(tmp_path):
    """The first command after its ``pip install`` step, as a new user would run it."""
    if shutil.which("replay") is None:
        pytest.skip("the replay command is not installed (pip install -e .)")
    steps = [s.strip() for s in readme_commands()[0].split("&&")]
    steps = [s for s in steps if not s.startswith("pip ")]
    work = tmp_path / "w"
    shutil.copytree(ROOT / "captures", work / "captures")
    env = dict(os.environ)
    for step in steps:
        argv = shlex.split(step)
        assert argv[0] == "replay"
        proc = subprocess.run([sys.executable, "-m", "replay.cli.main", *argv[1:]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{step}: {proc.stderr}"
        assert "Traceback" not in proc.stderr
