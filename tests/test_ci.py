"""CI (.ci/run) runs ruff, mypy --strict and the tests, and fails when any of them fails.

The script cannot run itself inside its own test run, so it runs here against stand-ins for the
tools it calls (each logs that it ran and exits as told): what is checked is the script's own
wiring, i.e. what it calls and which exit codes reach the caller.
"""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from conftest import REPO

TOOLS = ("python3", "python", "pip", "ruff", "mypy", "pytest", "chromium")


def _ci(tmp_path, **fail: tuple[int, str]) -> tuple[int, list[str]]:
    """Run a copy of .ci/run with stand-in tools; ``fail`` maps a tool to the exit code it gives
    when its arguments match a shell pattern."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in TOOLS:
        script = bin_dir / tool
        # python3 -m venv .venv must leave an activate script to source.
        venv = 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; fi\n' \
            if tool == "python3" else ""
        code, pattern = fail.get(tool, (0, "*"))
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n{venv}'
                          f'case "$*" in {pattern}) exit {code};; esac\nexit 0\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "CI": "true"}
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, [line.rstrip() for line in log.read_text().splitlines()]


def test_ci_runs_ruff_mypy_strict_and_the_tests(tmp_path):
    code, calls = _ci(tmp_path)
    assert code == 0
    assert "ruff check batchgen tests" in calls
    assert "mypy --strict batchgen" in calls
    assert calls[-1] == "pytest"  # last, so its summary closes the output


@pytest.mark.parametrize("tool", ["ruff", "mypy", "pytest"])
def test_ci_fails_when_a_check_fails(tmp_path, tool):
    code, calls = _ci(tmp_path, **{tool: (3, "*")})
    assert code != 0
    assert calls[-1] == "pytest"  # a lint or type finding does not hide the test results


def test_ci_fails_when_the_test_install_fails(tmp_path):
    # pip's failure inside `pip install '.[test]' && pytest` is no failing last command for set -e.
    script = (REPO / ".ci" / "run").read_text()
    assert "pip install '.[test]' && pytest" in script
    code, calls = _ci(tmp_path, pip=(2, '*".[test]"*'))
    assert code == 2
    assert "pytest" not in calls


def test_the_dev_extra_has_the_checkers():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("[")[0].lower() for req in extras["dev"]}
    assert {"ruff", "mypy", "batchgen"} <= names
