"""Every command the README and docs/ show is run here, or by the named test, or by CI.

Commands are read from the ```bash blocks of README.md and docs/*.md. The training walk-through
runs verbatim in a temporary directory; the daemon walk-through runs with the broker and HTTP
ports of this test and a shorter run (the substitutions are listed below). A command that
nothing covers fails `test_every_command_of_the_readme_and_docs_is_covered`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from daemon_harness import wait_until
from host_program import require

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

# Commands covered elsewhere: the prefix of the command -> where.
ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[demo]' && oteo demo": (
        ".ci/run does the install; tests/integration/test_demo_command.py runs oteo demo"
    ),
    "scripts/setup-test-env && python -m pytest -q": (
        ".ci/run runs scripts/setup-test-env, then the suite"
    ),
    "python -m pytest -q": ".ci/run",
    "ruff check daemon training tests": ".ci/run",
    "python -m daemon.jsonschema daemon/schema": "tests/unit/test_schema_drift.py",
    "python -m daemon.reference docs/metrics.md": "tests/unit/test_metrics.py",
    # docs/operations.md, and its examples in the README.
    "oteo run --model models/demo.onnx --broker mqtt://127.0.0.1:1883 --http 127.0.0.1:9108 &": (
        "tests/integration/test_operations_doc.py runs docs/operations.md against a daemon"
    ),
    "oteo simulate --broker mqtt://127.0.0.1:1883 --streams 4": "test_operations_doc.py",
    "oteo inspect --example-request": "test_operations_doc.py",
    "curl -s 127.0.0.1:9108/v1/": "test_operations_doc.py",
    "mosquitto_rr ": "test_operations_doc.py",
    "docker compose": "needs Docker: tests/integration/test_deploy.py parses compose.yaml",
    # The "Retrain" section.
    "sqlite3 ": "tests/integration/test_retrain_daemon.py copies a live recording with .backup",
    "scp ": "copies a file to another host; nothing of oteo's to test",
    "oteo retrain": (
        "tests/training/test_retrain.py (--normal-since, --config, --promote, a sha256 pin, a "
        "refused challenger) and tests/integration/test_retrain_daemon.py (against the daemon)"
    ),
    "oteo benchmark recorder": "prints numbers; not a test",
    # The "Benchmarks" section (the data are not in the repository).
    "oteo benchmark skab": (
        "tests/integration/test_skab_benchmark.py runs it with --out on ../shared/datasets"
    ),
    "oteo benchmark nab": "tests/integration/test_nab_benchmark.py runs it with --out",
    "oteo benchmark smap": "tests/integration/test_smap_benchmark.py (tarball and folder, --out)",
    "oteo benchmark suite": "tests/integration/test_suite_benchmark.py (synthetic datasets)",
    "systemctl": "needs systemd as PID 1: tests/integration/test_systemd.py verifies the units",
    "journalctl": "needs systemd as PID 1",
    "oteo benchmark throughput": "tests/integration/test_throughput_benchmark.py (--quick --json)",
    "oteo benchmark similar": "tests/integration/test_similar_benchmark.py (--quick --json)",
    "oteo benchmark scale": "tests/integration/test_scale_out.py (--quick --json)",
    "deploy/scale/run-local": "tests/integration/test_deploy_scale.py runs it (and --check)",
}
TRAINING = "oteo simulate --csv normal.csv"
DAEMON = "oteo run --model models/demo.onnx"


def page_commands(page: Path) -> list[str]:
    """Command lines of a page's bash blocks, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def readme_commands() -> list[str]:
    return page_commands(README)


def block_with(first: str) -> list[str]:
    commands = readme_commands()
    start = next(i for i, c in enumerate(commands) if c.startswith(first))
    end = start
    while end + 1 < len(commands) and not any(
        commands[end + 1].startswith(k) for k in (*ELSEWHERE, TRAINING, DAEMON)
    ):
        end += 1
    return commands[start : end + 1]


def test_every_command_of_the_readme_and_docs_is_covered() -> None:
    covered = set(block_with(TRAINING)) | set(block_with(DAEMON))
    loose = [
        (page.name, c)
        for page in PAGES
        for c in page_commands(page)
        if c not in covered and not c.startswith(tuple(ELSEWHERE))
    ]
    assert not loose, f"commands no test runs: {loose}"


def run(command: str, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def test_training_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    commands = block_with(TRAINING)
    assert any(c.startswith("oteo evaluate") for c in commands)
    for command in commands:
        done = run(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "models/pump.onnx").is_file()
    assert (tmp_path / "models/pump.report/index.html").is_file()
    assert (tmp_path / "eval/decisions.csv").is_file() and (tmp_path / "eval/score.png").is_file()
    metrics = json.loads(run("oteo evaluate models/pump.onnx test.csv --json", tmp_path).stdout)
    assert metrics["true_events"] >= 6 and 0.0 <= metrics["f1"] <= 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_walkthrough_runs_with_test_ports(tmp_path: Path, mosquitto) -> None:
    run_cmd, simulate_cmd, curl_cmd = block_with(DAEMON)
    require("curl")
    http = free_port()
    substitutions = {
        "1883": str(mosquitto.port),
        "9108": str(http),
        # A shorter run: 25 s instead of 120 at twice the rate, the fault 17 s in for 5 s: rows
        # 340..440, after the model's 300 s warm-up as the README's (row 600) is.
        "--rate 10": "--rate 20",
        "--duration 120": "--duration 25",
        "@60+30": "@17+5",
    }

    def adapt(command: str) -> str:
        for old, new in substitutions.items():
            command = command.replace(old, new)
        return command

    shutil.copytree(ROOT / "models", tmp_path / "models")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    daemon = subprocess.Popen(
        shlex.split(adapt(run_cmd)),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2).status
                    == 200
                ):
                    break
            except OSError:
                pass
            assert daemon.poll() is None and time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.2)
        sim = run(adapt(simulate_cmd), tmp_path, timeout_s=90)
        assert sim.returncode == 0, sim.stderr
        assert "published 10000 readings to 20 streams (10000 acknowledged" in sim.stdout

        def scrape() -> tuple[str, dict[str, float]]:
            out = run(adapt(curl_cmd), tmp_path).stdout
            return out, {k: float(v) for k, v in re.findall(r'kind="(\w+)"\} ([0-9.]+)', out)}

        # The last readings are scored a moment after the broker acknowledged them.
        wait_until(lambda: min(scrape()[1].get(k, 0.0) for k in ("start", "end")) >= 1, 10)
        out, counts = scrape()
        assert counts["start"] >= 1 and counts["end"] >= 1, out
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
