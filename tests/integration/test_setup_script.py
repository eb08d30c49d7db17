"""scripts/setup-test-env: the one script that makes the README's test command pass on Debian.

It installs every Debian package whose programs the tests run (tests/host_program.py lists them)
and oteo with its test extras; .ci/run calls it too. Here: the list covers every program a test
runs, and on this machine nothing is missing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from host_program import PROGRAMS, missing_packages

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "setup-test-env"
# Where a test names a program it runs: a subprocess call's first word, which() / require() /
# tool(), and a command list kept in a variable ( mount = ["mount", "-t", ...] ).
RUNS = (
    re.compile(r'subprocess\.(?:run|Popen|check_call|check_output)\(\s*\[\s*"([\w.-]+)"'),
    re.compile(r'\b(?:which|require|tool)\(\s*"([\w.-]+)"'),
    re.compile(r'=\s*\[\s*"([\w.-]+)",\s*"-'),
)
ESSENTIAL = {"sleep", "sh", "bash"}  # in every Debian install


def programs_the_tests_run() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in RUNS:
            for match in pattern.finditer(text):
                found.setdefault(match.group(1), set()).add(path.name)
    return found


def test_every_program_a_test_runs_is_installed_by_the_setup_script() -> None:
    found = programs_the_tests_run()
    assert {"mosquitto", "amtool", "promtool", "sqlite3", "docker-compose"} <= set(found)
    unlisted = {name: files for name, files in found.items() if name not in PROGRAMS}
    assert not set(unlisted) - ESSENTIAL, f"add to tests/host_program.py PROGRAMS: {unlisted}"


def test_nothing_is_missing_on_this_machine() -> None:
    result = subprocess.run(
        [str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert missing_packages() == []


def test_ci_and_the_readme_use_the_script() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/setup-test-env" in ci
    for step in ("ruff check", "ruff format --check", "mypy", "python -m pytest -q"):
        assert step in ci, f".ci/run lost {step}"
    assert '"$rc" -eq 5' in ci, ".ci/run must fail when pytest collects nothing"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "\nscripts/setup-test-env && python -m pytest -q\n" in readme
