"""systemd/oteo@.service: one daemon per partition index, hardened exactly like oteo.service.

`systemd-analyze verify` on the template and on an instance of it, `systemd-analyze security
--offline=true` at most 2.0, and the directives that differ from oteo.service, each for a
reason: the index on the command line, per-index state and HTTP port, a shared user and
checkpoint directory; and an instance's command line running the real daemon on a real
nats-server, owning its partitions. (test_systemd.py runs oteo.service's sandbox with the real
daemon; the template's sandbox directives are the same lines, compared here one by one.)
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from daemon_harness import Metrics, daemon_config, free_port, oteo_command, toml_text, wait_until
from nats_kit import NatsServer, mqtt_client
from test_systemd import (
    DEMO_MODEL,
    MAX_EXPOSURE,
    SANDBOX_KEYS,
    UNIT,
    UNIT_OTEO,
    analyze,
    the,
    unit_directives,
)

TEMPLATE = UNIT.parent / "oteo@.service"
# oteo.service settings the template deliberately changes, and why.
TEMPLATE_EXCEPTIONS = {
    "StateDirectory",  # per index, plus the partitions' checkpoints shared on the box
}


@pytest.fixture(scope="module")
def template() -> dict[str, list[str]]:
    return unit_directives(TEMPLATE.read_text(encoding="utf-8"))


def instance_args(template: dict[str, list[str]], index: int, host: str, http: str) -> list[str]:
    """ExecStart's arguments as systemd would pass them to instance `index` on `host`."""
    line = the(template, "ExecStart")
    line = line.replace("%i", str(index)).replace("%l", host).replace("${OTEO_HTTP}", http)
    assert "%" not in line and "$" not in line, f"unexpanded specifier left in {line!r}"
    return shlex.split(line)


def test_template_passes_its_index_and_keeps_instances_apart(
    template: dict[str, list[str]],
) -> None:
    args = instance_args(template, 3, "box-a", "127.0.0.1:9113")
    assert args[:4] == [UNIT_OTEO, "run", "--config", "/etc/oteo/oteo.toml"]
    options = dict(zip(args[4::2], args[5::2], strict=True))
    assert options == {
        "--partition-index": "3",
        "--instance": "box-a-3",  # status topic and normal MQTT session, unique across boxes
        "--http": "127.0.0.1:9113",  # instances on one box need their own listeners
    }
    assert the(template, "EnvironmentFile") == "/etc/oteo/oteo@%i.env"
    assert the(template, "StateDirectory").split() == ["oteo/%i", "oteo/partitions"]
    assert the(template, "User") == "oteo" and the(template, "DynamicUser") == "yes"
    assert "%i" in the(template, "Description")


def test_template_is_hardened_like_oteo_service(template: dict[str, list[str]]) -> None:
    unit = unit_directives(UNIT.read_text(encoding="utf-8"))
    for key in SANDBOX_KEYS:
        if key not in TEMPLATE_EXCEPTIONS:
            assert template.get(key) == unit.get(key), f"{key}= differs from oteo.service"
    same = (
        "Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartPreventExitStatus",
        "ExecReload", "TimeoutStopSec", "MemoryMax", "TasksMax", "ConfigurationDirectory",
    )  # fmt: skip
    for key in same:
        assert template.get(key) == unit.get(key), f"{key}= differs from oteo.service"


def test_template_and_an_instance_pass_verify_with_an_existing_binary(tmp_path: Path) -> None:
    script = Path(oteo_command()[0])
    text = TEMPLATE.read_text(encoding="utf-8")
    assert UNIT_OTEO in text
    names = ("oteo@.service", "oteo@0.service")
    for name in names:
        (tmp_path / name).write_text(text.replace(UNIT_OTEO, str(script)), encoding="utf-8")
    result = analyze("verify", *(str(tmp_path / name) for name in names))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_of_the_committed_template_only_misses_the_venv() -> None:
    result = analyze("verify", str(TEMPLATE))
    if Path(UNIT_OTEO).exists():
        assert result.returncode == 0, result.stdout + result.stderr
        return
    complaints = (result.stdout + result.stderr).strip().splitlines()
    assert complaints == [
        f"oteo@i.service: Command {UNIT_OTEO} is not executable: No such file or directory"
    ]


def test_template_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    instance = tmp_path / "oteo@1.service"
    instance.write_text(TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    for path, name in ((TEMPLATE, "oteo@i.service"), (instance, "oteo@1.service")):
        result = analyze(
            "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", str(path)
        )
        found = re.search(
            rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)", result.stdout
        )
        assert found, result.stdout + result.stderr
        print(f"{name} exposure: {found.group(1)}")
        assert float(found.group(1)) <= MAX_EXPOSURE and result.returncode == 0, result.stdout


def test_an_instance_command_line_runs_the_daemon_with_its_partitions(tmp_path: Path) -> None:
    """ExecStart of oteo@1 (this environment's oteo, a test config) on a real nats-server: the
    daemon owns partitions 1 and 3 of 4 (index 1 of 2), serves on the port from its environment
    file, and publishes its status under the instance name <host>-1."""
    nats = NatsServer(tmp_path / "nats", count=4)
    nats.start()
    http_port = free_port()
    config = tmp_path / "oteo.toml"
    doc = daemon_config(tmp_path, nats.url, DEMO_MODEL, mqtt={"protocol": "3.1.1"})
    doc["partitions"] = {"count": 4, "of": 2, "index": 0, "redelivery_wait_s": 0}
    config.write_text(toml_text(doc), encoding="utf-8")
    template = unit_directives(TEMPLATE.read_text(encoding="utf-8"))
    args = instance_args(template, 1, "box-a", f"127.0.0.1:{http_port}")
    args = [*oteo_command(), *args[1:]]
    args[args.index("/etc/oteo/oteo.toml")] = str(config)
    watcher = mqtt_client(nats)
    statuses: list[str] = []
    watcher.on_message = lambda _c, _u, msg: statuses.append(msg.topic)
    watcher.subscribe("oteo/status/+", qos=1)
    log = (tmp_path / "oteo.log").open("wb")
    daemon = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:

        def owned() -> dict[str, float]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics") as answer:
                    metrics = Metrics(answer.read().decode())
            except OSError:
                return {}
            return {labels["partition"]: v for labels, v in metrics.series("oteo_partition_owned")}

        expected = {"1": 1.0, "3": 1.0}
        assert wait_until(lambda: owned() == expected, 30), (tmp_path / "oteo.log").read_text()
        assert wait_until(lambda: "oteo/status/box-a-1" in statuses, 10), statuses
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        log.close()
        watcher.loop_stop()
        nats.stop()
    assert code == 0, (tmp_path / "oteo.log").read_text()
