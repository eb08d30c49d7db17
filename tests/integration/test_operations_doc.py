"""docs/operations.md, run as written against a real daemon and a real Mosquitto.

Every command of the page runs with this test's broker and HTTP ports; each reply must be the
documented JSON (schema 1, no error), so the page's request bodies stay valid.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from daemon_harness import free_port, wait_until
from host_program import require
from test_readme import page_commands

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent


def test_every_operation_on_the_page_answers_as_documented(tmp_path: Path, mosquitto) -> None:
    require("curl")
    require("mosquitto_rr")
    http = free_port()

    def adapt(command: str) -> str:
        return command.replace("1883", str(mosquitto.port)).replace("9108", str(http))

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    shutil.copytree(ROOT / "models", tmp_path / "models")
    commands = [adapt(c) for c in page_commands(PAGE)]
    assert commands[0].startswith("oteo run") and commands[0].endswith(" &")
    daemon = subprocess.Popen(
        shlex.split(commands[0][:-2]), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    replies: dict[str, dict] = {}
    try:

        def ready() -> bool:
            probe = subprocess.run(
                ["curl", "-sf", f"127.0.0.1:{http}/readyz"], capture_output=True, check=False
            )
            return probe.returncode == 0

        assert wait_until(ready, 30), "the page's daemon did not become ready"
        for command in commands[1:]:
            done = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            if command.startswith(("curl", "mosquitto_rr")):
                replies[command] = json.loads(done.stdout)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    ops = {}
    for command, reply in replies.items():
        if isinstance(reply, list):  # /v1/streams
            assert {s["stream"] for s in reply} >= {"sim-3"}
            continue
        assert reply["schema"] == 1 and "error" not in reply, (command, reply)
        ops.setdefault(reply["op"], reply)
    assert set(ops) == {"score", "denoise", "encode", "hash", "mute", "unmute", "sensitivity"}
    assert ops["score"]["id"] == "example-1" and len(ops["score"]["score"]) == 1
    assert ops["mute"]["ok"] and ops["mute"]["state"] == "muted"
    assert int(ops["hash"]["bits"][0], 16) >= 0 and ops["hash"]["nbits"] > 0
