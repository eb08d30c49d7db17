"""Start-up: what `oteo check-config` approves, `oteo run` starts with; every refusal is one line.

Both commands run the checks of daemon/startup.py: the config file, its secret and TLS files, the
model it names and the alarm overrides against the model's own policy. A refusal is exactly one
line on stderr and exit code 78 (systemd's unit does not restart on it).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Broker
from daemon_harness import OteoProcess, daemon_config, oteo_command, run_oteo, toml_text

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"
UNREACHABLE = "mqtt://127.0.0.1:1"  # run must refuse before it ever connects


def write_config(directory: Path, model: Path = DEMO_MODEL, **sections: object) -> Path:
    doc = daemon_config(directory, UNREACHABLE, model, **sections)
    path = directory / "oteo.toml"
    path.write_text(toml_text(doc), encoding="utf-8")
    return path


def bad_ca(directory: Path) -> dict[str, object]:
    ca = directory / "ca.pem"
    ca.write_text("not a certificate\n", encoding="utf-8")
    return {"mqtt": {"url": "mqtts://127.0.0.1:1", "ca_file": str(ca)}}


def open_password(directory: Path) -> dict[str, object]:
    secret = directory / "mqtt-password"
    secret.write_text("hunter2\n", encoding="utf-8")
    secret.chmod(0o644)
    return {"mqtt": {"username": "oteo", "password_file": str(secret)}}


BAD = {
    # (config sections, the one error line): approved by check-config before, fatal to run.
    "k_over_n": ({"alarm": {"k": 6}}, "error: alarm: k (6) must not exceed n (5)"),
    "exit_above_enter": (
        {"alarm": {"enter_threshold": 2.0, "exit_threshold": 3.0}},
        "error: alarm: exit_threshold (3.0) must not exceed enter_threshold (2.0)",
    ),
    "exit_above_the_models_enter": (
        {"alarm": {"exit_threshold": 1e6}},
        "error: alarm: exit_threshold (1000000.0) must not exceed enter_threshold (",
    ),
    "k_as_a_string": ({"alarm": {"k": "3"}}, "error: alarm.k: Input should be a valid integer"),
    "missing_model": ({"model": Path("/nonexistent/m.onnx")}, "error: /nonexistent/m.onnx: "),
    "bad_ca_file": (bad_ca, "error: mqtt.ca_file: cannot load "),
    "password_readable_by_all": (open_password, "error: mqtt.password_file: "),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_config_refuses_what_run_refuses_in_one_line(tmp_path: Path, case: str) -> None:
    sections, expected = BAD[case]
    if callable(sections):
        sections = sections(tmp_path)
    assert isinstance(sections, dict)
    config = write_config(tmp_path, **sections)

    checked = run_oteo("check-config", str(config))
    ran = run_oteo("run", "--config", str(config), timeout_s=30)

    for result in (checked, ran):
        assert result.returncode == 78, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1, f"not one line:\n{result.stderr}"
        assert result.stderr.startswith(expected), result.stderr
    assert checked.stderr == ran.stderr
    assert checked.stdout == "", "a refused config must not print as if it were effective"


def test_check_config_reports_the_model_and_the_effective_alarm_policy(tmp_path: Path) -> None:
    config = write_config(tmp_path, alarm={"k": 2})
    result = run_oteo("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["alarm"]["k"] == 2  # the config itself, on stdout
    report = result.stderr.splitlines()
    assert report[0].startswith(f"model {DEMO_MODEL}: demo ")
    assert "sha256 " in report[0]
    assert report[1].startswith("alarm policy (set by the config: k): enter ")
    assert " 2 of 5 windows" in report[1]
    assert report[-1] == f"{config}: OK"


def test_shipped_example_passes_check_config_from_the_repository_root() -> None:
    result = subprocess.run(
        oteo_command("check-config", "examples/oteo.toml"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["model"]["path"] == "models/demo.onnx"
    assert "(the model's)" in result.stderr


def test_a_reload_into_a_bad_alarm_policy_keeps_the_daemon_serving(
    tmp_path: Path, mosquitto: Broker
) -> None:
    daemon = OteoProcess(tmp_path, daemon_config(tmp_path, mosquitto.url, DEMO_MODEL))
    daemon.start()
    try:
        daemon.config["alarm"] = {"k": 6}
        daemon.write_config()
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_metric(
            lambda m: m.get("oteo_model_reloads_total", result="failed") == 1,
            what="the refused reload",
        )
        assert daemon.running
        assert "reload (SIGHUP) failed, the current model keeps serving: alarm: k (6)" in (
            daemon.log_text()
        )
        assert daemon.get("/readyz")[0] == 200
    finally:
        assert daemon.stop() == 0
