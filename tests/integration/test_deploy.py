"""deploy/ checked without Docker: the real parsers and the real broker.

- Prometheus: `promtool check config`, `promtool check rules`, `promtool test rules` (a firing and
  a non-firing case for every alert), and every metric the rules use exists in the daemon.
- Alertmanager: `amtool check-config` and its routes (`amtool config routes test`).
- Compose: Debian's `docker-compose config -q` when installed, plus structural checks (services,
  pinned images, every bind-mounted file and secret exists, healthchecks, and the paths in the
  mounted configs match the mount points).
- Mosquitto: the real broker accepts deploy/mosquitto/mosquitto.conf (only listener, paths and
  user rewritten for the test), and its password file and ACL give oteo and the sensors least
  privilege; the real daemon runs with deploy/oteo.toml (only addresses and paths rewritten)
  against that broker.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from daemon_harness import OteoProcess, free_port, run_oteo, v5_request_properties
from host_program import require
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
COMPOSE = DEPLOY / "compose.yaml"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
DEMO_MODEL = REPO / "models" / "demo.onnx"
SERVICES = {"mosquitto", "oteo", "prometheus", "alertmanager", "grafana"}
REQUIRED_ALERTS = {
    "OteoDown",
    "OteoAbsent",
    "OteoMqttDisconnected",
    "OteoNoSensorData",
    "OteoDroppingMessages",
    "OteoModelReloadFailed",
    "OteoInferenceSlow",
    "OteoAnomalyActive",
    "OteoAnomalyRateHigh",
    "OteoStreamStale",
    "OteoOutboxGrowing",
    "OteoRetrainingDue",
}
Broker = Any  # conftest.Broker


# -- helpers ---------------------------------------------------------------------------------


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(f"{name} not found: install Debian's {package} (apt-get install {package})")
    return found


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{out}"
    return out


def load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: it is in the [test] extra (pip install -e '.[test]')")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def daemon_metric_names() -> set[str]:
    """Every sample name the daemon can export (with _total, _bucket, _sum, _count suffixes)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    registry = Metrics().registry
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def referenced_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\boteo_[a-z0-9_]+", expr))


def rules() -> list[dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "rules.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = tool("promtool", "prometheus")
    out = ok(run(promtool, "check", "config", "deploy/prometheus/prometheus.yml"))
    assert "1 rule files found" in out, out  # rule_files resolved relative to the config
    ok(run(promtool, "check", "rules", "deploy/prometheus/rules.yml"))


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    out = ok(run(promtool, "test", "rules", "tests.yml", cwd=PROMETHEUS))
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_and_a_non_firing_unit_test() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - alerts}"
    tests = load_yaml(PROMETHEUS / "tests.yml")
    assert tests["rule_files"] == ["rules.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert not alerts - firing, f"alerts without a firing case: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts without a non-firing case: {sorted(alerts - quiet)}"


def test_alert_rules_are_labelled_annotated_and_use_real_metric_names() -> None:
    known = daemon_metric_names()
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["labels"]["category"] in ("oteo", "anomaly"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        unknown = referenced_metrics(rule["expr"]) - known
        assert not unknown, f"{name} uses metrics the daemon does not export: {unknown}"
    by_name = {rule["alert"]: rule for rule in rules()}
    assert 'absent(up{job="oteo"})' in by_name["OteoAbsent"]["expr"]
    assert "stream" in by_name["OteoAnomalyActive"]["annotations"]["summary"]
    # Every oteo metric named in the unit tests exists too (a typo there tests nothing).
    tests_text = (PROMETHEUS / "tests.yml").read_text(encoding="utf-8")
    assert not referenced_metrics(tests_text) - known


def test_prometheus_scrapes_oteo_and_sends_alerts_to_alertmanager() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["oteo"]["static_configs"] for t in sc["targets"]]
    assert targets == ["oteo:9108"]
    managers = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert managers == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules.yml"]


# -- Alertmanager ----------------------------------------------------------------------------


def test_alertmanager_config_passes_amtool_and_routes_by_severity() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    config = "deploy/alertmanager/alertmanager.yml"
    ok(run(amtool, "check-config", config))
    for labels, receiver in (
        (["alertname=OteoDown", "severity=critical", "category=oteo"], "on-call"),
        (["alertname=OteoStreamStale", "severity=warning", "category=oteo"], "team-email"),
        (["alertname=OteoAnomalyActive", "severity=warning", "category=anomaly"], "machine-team"),
        (["alertname=Other"], "team-email"),
    ):
        ok(
            run(
                amtool,
                "config",
                "routes",
                "test",
                f"--config.file={config}",
                f"--verify.receivers={receiver}",
                *labels,
            )
        )


# -- compose ---------------------------------------------------------------------------------


def test_compose_file_parses() -> None:
    ok(run(require("docker-compose"), "-f", str(COMPOSE), "config", "-q"))


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((DEPLOY / source).resolve(), target))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind `container_path` through the service's bind mounts."""
    for source, target in bind_mounts(service):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    return None


def test_compose_structure_mounts_secrets_and_healthchecks() -> None:
    doc = load_yaml(COMPOSE)
    services = doc["services"]
    assert set(services) >= SERVICES
    for name, service in services.items():
        image = service.get("image", "")
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned to a version"
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name}: bind mount {source} -> {target} does not exist"
            assert source.is_relative_to(REPO), f"{name}: {source} is outside the repository"
        for secret in service.get("secrets", []):
            assert secret in doc["secrets"], f"{name}: undeclared secret {secret}"
    for secret, spec in doc["secrets"].items():
        path = (DEPLOY / spec["file"]).resolve()
        assert path.is_file() and path.read_text().strip(), f"secret {secret}: {path}"
    images = {name: service["image"] for name, service in services.items()}
    assert images["mosquitto"].startswith("eclipse-mosquitto:2")
    assert images["prometheus"] == "prom/prometheus:v2.42.0"
    assert images["alertmanager"].startswith("prom/alertmanager:v")
    assert images["grafana"].startswith("grafana/grafana-oss:")
    for name in ("oteo", "prometheus", "alertmanager", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    assert any("/healthz" in part for part in services["oteo"]["healthcheck"]["test"])


def test_compose_oteo_service_matches_its_config_and_image() -> None:
    doc = load_yaml(COMPOSE)
    oteo = doc["services"]["oteo"]
    build = oteo["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    dockerfile = (context / build["dockerfile"]).read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"^RUN pip install /tmp/src\b", dockerfile, re.M), "base install, no extras"
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in code.replace("find_spec('torch')", ""), "the image installs torch"
    assert "[" not in re.findall(r"pip install (\S+)", code)[0], "no extras in the image"
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for item in copied.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which does not exist"

    # The config the container runs, read through its mounts.
    command = oteo["command"]
    config_in_container = command[command.index("--config") + 1]
    config_path = host_path(oteo, config_in_container)
    assert config_path == DEPLOY / "oteo.toml" and any(
        v.endswith(":ro") for v in oteo["volumes"] if v.startswith("./oteo.toml")
    ), "the config is mounted read-only"
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    secrets = {f"/run/secrets/{name}" for name in oteo["secrets"]}
    assert config["mqtt"]["password_file"] in secrets
    assert config["http"]["token_file"] in secrets
    assert config["http"]["bind"] == "0.0.0.0" and config["http"]["port"] == 9108
    assert config["mqtt"]["url"] == "mqtt://mosquitto:1883"
    model = host_path(oteo, config["model"]["path"])
    assert model is not None and model.is_file(), f"model {config['model']['path']} not mounted"
    state = [v for v in oteo["volumes"] if v.split(":")[1] == config["state_dir"]]
    assert state and state[0].split(":")[0] in doc["volumes"], "state_dir is not a named volume"


def test_compose_other_services_find_their_mounted_configs() -> None:
    doc = load_yaml(COMPOSE)
    services = doc["services"]
    mosquitto = services["mosquitto"]
    conf = host_path(mosquitto, "/mosquitto/config/mosquitto.conf")
    assert conf == MOSQUITTO_CONF
    settings = dict(
        line.split(None, 1) for line in conf.read_text().splitlines() if line and line[0] != "#"
    )
    for key in ("password_file", "acl_file"):
        path = host_path(mosquitto, settings[key])
        assert path is not None and path.is_file(), f"mosquitto {key} {settings[key]} not mounted"
    data = [v for v in mosquitto["volumes"] if v.split(":")[1].rstrip("/") == "/mosquitto/data"]
    assert settings["persistence_location"].rstrip("/") == "/mosquitto/data" and data

    prometheus = services["prometheus"]
    flags = dict(flag.split("=", 1) for flag in prometheus["command"])
    prom_config = host_path(prometheus, flags["--config.file"])
    assert prom_config == PROMETHEUS / "prometheus.yml"
    rules_in_container = str(Path(flags["--config.file"]).parent / "rules.yml")
    assert host_path(prometheus, rules_in_container) == PROMETHEUS / "rules.yml"

    alertmanager = services["alertmanager"]
    flags = dict(flag.split("=", 1) for flag in alertmanager["command"])
    assert host_path(alertmanager, flags["--config.file"]) == (
        DEPLOY / "alertmanager" / "alertmanager.yml"
    )

    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning/datasources")
    assert provisioning is not None
    datasources = [
        ds for f in sorted(provisioning.glob("*.yml")) for ds in load_yaml(f)["datasources"]
    ]
    by_type = {ds["type"]: ds for ds in datasources}
    assert by_type["prometheus"]["uid"] == "oteo-prometheus"
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["alertmanager"]["url"] == "http://alertmanager:9093"
    providers_dir = host_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert providers_dir is not None
    providers = [p for f in sorted(providers_dir.glob("*.yml")) for p in load_yaml(f)["providers"]]
    dashboards = host_path(grafana, providers[0]["options"]["path"])
    assert dashboards is not None and (dashboards / "oteo.json").is_file()
    password_file = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert password_file.removeprefix("/run/secrets/") in grafana["secrets"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == DEPLOY / "grafana" / "dashboards" / "oteo.json"


def private_copy(secret: Path, directory: Path) -> Path:
    """A mode-0600 copy of a committed example secret (git checks files out 0644, which the
    daemon refuses outside a container's /run/secrets)."""
    copy = directory / secret.name
    copy.write_bytes(secret.read_bytes())
    copy.chmod(0o600)
    return copy


def test_container_config_passes_check_config(tmp_path: Path) -> None:
    """deploy/oteo.toml as the container sees it: /run/secrets/* pointed at private copies,
    /models at the repository's models/."""
    text = (DEPLOY / "oteo.toml").read_text(encoding="utf-8")
    for name in ("mqtt-password", "http-token"):
        assert f"/run/secrets/{name}" in text
        text = text.replace(
            f"/run/secrets/{name}", str(private_copy(DEPLOY / "secrets" / name, tmp_path))
        )
    # check-config loads the model too: the container's /models is the repository's models/.
    assert '"/models/' in text
    text = text.replace('"/models/', f'"{DEPLOY.parent / "models"}/')
    config = tmp_path / "oteo.toml"
    config.write_text(text, encoding="utf-8")
    result = run_oteo("check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "change-me" not in result.stdout, "check-config printed a secret"


# -- Mosquitto with the deploy config --------------------------------------------------------

PASSWORDS = {
    "oteo": (DEPLOY / "secrets" / "mqtt-password").read_text().rstrip("\r\n"),
    "pump-1": "pump-1-test-password",
    "pump-2": "pump-2-test-password",
    "monitor": "monitor-test-password",
    "operator": "operator-test-password",
}


def deploy_mosquitto_conf(text: str, port: int, directory: Path) -> str:
    """The deploy config with only the listener, file paths and user changed for the test."""
    replaced: dict[str, int] = {}

    def line_for(line: str) -> str:
        key = line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""
        new = {
            "listener": f"listener {port} 127.0.0.1",
            "persistence_location": f"persistence_location {directory}/",
            "password_file": f"password_file {directory / 'passwd'}",
            "acl_file": f"acl_file {directory / 'acl'}",
        }.get(key)
        if new is None:
            return line
        replaced[key] = replaced.get(key, 0) + 1
        return new

    lines = [line_for(line) for line in text.splitlines()]
    assert replaced == dict.fromkeys(
        ("listener", "persistence_location", "password_file", "acl_file"), 1
    ), replaced
    assert not any(line.startswith("user ") for line in lines)
    # We run as root: without it Mosquitto drops to user mosquitto, which cannot use tmp_path.
    return "\n".join([*lines, "user root", ""])


@pytest.fixture
def deploy_broker(make_broker: Callable[..., Broker]) -> Broker:
    """Mosquitto running deploy/mosquitto/mosquitto.conf, with test sensors and users added."""
    broker = make_broker(start=False)
    directory = broker.directory
    shutil.copy(DEPLOY / "mosquitto" / "acl", directory / "acl")
    shutil.copy(DEPLOY / "mosquitto" / "passwd", directory / "passwd")
    passwd_tool = tool("mosquitto_passwd", "mosquitto")
    for user, password in PASSWORDS.items():
        if user != "oteo":  # oteo's entry is the committed one, matching secrets/mqtt-password
            ok(run(passwd_tool, "-b", str(directory / "passwd"), user, password))
    conf = deploy_mosquitto_conf(MOSQUITTO_CONF.read_text(), broker.port, directory)
    broker.conf_path.write_text(conf, encoding="utf-8")
    broker.start()
    return broker


class Client:
    """A paho MQTT v5 client driven from the test thread (loop() in between, never threads)."""

    def __init__(self, port: int, user: str | None, password: str | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        if user is not None:
            self.client.username_pw_set(user, password)
        self.connack: Any = None
        self.subacks: list[Any] = []
        self.pubacks: dict[int, Any] = {}
        self.messages: list[paho.MQTTMessage] = []
        self.client.on_connect = lambda _c, _u, _f, reason, _p: setattr(self, "connack", reason)
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: self.subacks.append(reasons)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.pubacks.update({mid: reason})
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.pump_until(lambda: self.connack is not None, "CONNACK")

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def pump_until(self, done: Callable[[], Any], what: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.client.loop(0.02)

    def subscribe(self, topic: str) -> Any:
        """The SUBACK reason code of one subscription (QoS 1)."""
        count = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        self.pump_until(lambda: len(self.subacks) > count, f"SUBACK for {topic}")
        return self.subacks[-1][0]

    def publish(self, topic: str, payload: bytes, **kw: Any) -> Any:
        """Publish at QoS 1; the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, **kw)
        self.pump_until(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self, topic: str) -> list[bytes]:
        return [bytes(m.payload) for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str, payload: bytes, timeout_s: float = 5.0) -> None:
        self.pump_until(
            lambda: payload in self.received(topic), f"{payload!r} on {topic}", timeout_s
        )

    def close(self) -> None:
        if self.connected:
            self.client.disconnect()
            self.client.loop(0.05)


@pytest.fixture
def connect(deploy_broker: Broker) -> Iterator[Callable[..., Client]]:
    """connect(user) -> a client logged in with the user's test password."""
    made: list[Client] = []

    def make(user: str | None, password: str | None = None) -> Client:
        secret = password if password is not None else PASSWORDS.get(user or "")
        client = Client(deploy_broker.port, user, secret)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def assert_not_delivered(
    sender: Client,
    receiver: Client,
    denied: tuple[str, bytes],
    allowed: tuple[str, bytes],
    allowed_sender: Client | None = None,
) -> None:
    """`denied` is dropped by the broker: `allowed`, sent after it, arrives; `denied` never.

    A denied publish is silent (at most a PUBACK reason code), so look at the receiver. The
    broker routes a QoS 1 message before it acknowledges it, and keeps the order of what it
    routes to one subscriber: once the later `allowed` is in, `denied` would have been too.
    """
    sender.publish(*denied)
    (allowed_sender or sender).publish(*allowed)
    receiver.wait_for(*allowed)
    receiver.client.loop(0.05)
    assert denied[1] not in receiver.received(denied[0]), f"the broker delivered {denied}"


def test_mosquitto_accepts_the_deploy_config_and_refuses_strangers(
    deploy_broker: Broker, connect: Callable[..., Client]
) -> None:
    complaints = [
        line
        for line in deploy_broker.log_text().splitlines()
        if re.search(r"error|warning|note:|recommended", line, re.I)
        and "should not be run as root" not in line  # the test's `user root`
    ]
    assert not complaints, "\n".join(complaints)
    assert connect("oteo").connected, "the committed oteo password (secrets/) is refused"
    assert not connect(None).connected, "anonymous clients must be refused"
    assert not connect("oteo", "not-the-password").connected, "a wrong password must be refused"
    assert not connect("pump-1", PASSWORDS["pump-2"]).connected


def test_acl_oteo_reads_every_sensor_and_a_sensor_writes_only_its_own_topics(
    connect: Callable[..., Client],
) -> None:
    oteo = connect("oteo")
    pump1, pump2 = connect("pump-1"), connect("pump-2")
    monitor = connect("monitor")
    # What the daemon subscribes to (service.py): readings, per-channel readings, ops requests.
    for topic in ("sensors/#", "sensors/+/data", "sensors/+/ch/+", "oteo/ops/edge-1/+"):
        assert not oteo.subscribe(topic).is_failure, topic
    assert not monitor.subscribe("oteo/+/event").is_failure

    reading = b'{"ts": 1, "values": [1, 2, 3, 4, 5, 6, 7, 8]}'
    assert not pump1.publish("sensors/pump-1/data", reading).is_failure
    oteo.wait_for("sensors/pump-1/data", reading)
    pump1.publish("sensors/pump-1/ch/pressure_bar", b"4.2")
    oteo.wait_for("sensors/pump-1/ch/pressure_bar", b"4.2")

    # pump-2 impersonating pump-1 is dropped by the broker.
    assert_not_delivered(
        pump2,
        oteo,
        ("sensors/pump-1/data", b'{"ts": 2, "forged": true}'),
        ("sensors/pump-2/data", b'{"ts": 2, "marker": true}'),
    )
    # A sensor reads nothing: its subscription is refused, or at least nothing arrives.
    spy = pump2.subscribe("sensors/#")
    pump1.publish("sensors/pump-1/data", b"secret-reading")
    oteo.wait_for("sensors/pump-1/data", b"secret-reading")
    pump2.client.loop(0.1)
    assert spy.is_failure or not pump2.received("sensors/pump-1/data")
    assert not pump2.received("sensors/pump-1/data"), "a sensor read another sensor's readings"

    # A sensor can fake neither oteo's outputs nor ops requests.
    assert_not_delivered(
        pump1,
        monitor,
        ("oteo/pump-1/event", b'{"forged": true}'),
        ("oteo/pump-1/event", b'{"from": "oteo"}'),
        allowed_sender=oteo,
    )
    operator = connect("operator")
    assert_not_delivered(
        pump1,
        oteo,
        ("oteo/ops/edge-1/score", b'{"forged": true}'),
        ("oteo/ops/edge-1/score", b'{"from": "operator"}'),
        allowed_sender=operator,
    )
    # oteo only reads readings: it cannot inject readings of a stream.
    oteo2 = connect("oteo")
    assert not oteo2.subscribe("sensors/+/data").is_failure
    assert_not_delivered(
        oteo,
        oteo2,
        ("sensors/pump-1/data", b'{"from": "oteo"}'),
        ("sensors/pump-1/data", b"marker-3"),
        allowed_sender=pump1,
    )
    # The monitor only reads.
    assert_not_delivered(
        monitor,
        oteo,
        ("sensors/pump-1/data", b'{"from": "monitor"}'),
        ("sensors/pump-1/data", b"marker-4"),
        allowed_sender=pump1,
    )


def test_real_daemon_runs_with_the_deploy_config_on_the_deploy_broker(
    deploy_broker: Broker, connect: Callable[..., Client], tmp_path: Path
) -> None:
    """deploy/oteo.toml with only addresses and paths rewritten for the test: the daemon logs in
    as oteo with the committed secret, subscribes within its ACL, scores a sensor's readings,
    publishes state and status a monitor can read, and answers an operator's ops request."""
    config = tomllib.loads((DEPLOY / "oteo.toml").read_text(encoding="utf-8"))
    config["state_dir"] = str(tmp_path / "state")
    config["model"]["path"] = str(DEMO_MODEL)
    config["mqtt"]["url"] = deploy_broker.url
    config["mqtt"]["password_file"] = str(
        private_copy(DEPLOY / "secrets" / "mqtt-password", tmp_path)
    )
    config["http"] = {
        "bind": "127.0.0.1",
        "port": free_port(),
        "token_file": str(private_copy(DEPLOY / "secrets" / "http-token", tmp_path)),
    }
    instance = config["instance"]
    monitor = connect("monitor")
    for topic in ("oteo/status/+", "oteo/+/state"):
        assert not monitor.subscribe(topic).is_failure
    operator = connect("operator")
    assert not operator.subscribe("oteo/reply/operator/#").is_failure

    directory = tmp_path / "oteo"
    directory.mkdir()
    daemon = OteoProcess(directory, config)  # writes the config as TOML
    try:
        daemon.start()  # waits for /readyz: model loaded and the broker accepted oteo
        monitor.pump_until(
            lambda: any(b'"online"' in p for p in monitor.received(f"oteo/status/{instance}")),
            "status online",
        )
        pump1 = connect("pump-1")
        rows = 40
        for i in range(rows):
            payload = json.dumps({"ts": 1_767_225_600 + i, "seq": i, "values": [1.0] * 8})
            pump1.publish("sensors/pump-1/data", payload.encode())
        daemon.wait_metric(
            lambda m: m("oteo_readings_total") == rows, 10, f"{rows} readings from pump-1"
        )
        monitor.pump_until(lambda: monitor.received("oteo/pump-1/state"), "pump-1 state")

        props = v5_request_properties("oteo/reply/operator/1", b"corr-1")
        request = json.dumps({"windows": [], "id": "req-1"}).encode()
        operator.publish(f"oteo/ops/{instance}/score", request, properties=props)
        operator.pump_until(lambda: operator.received("oteo/reply/operator/1"), "ops reply")
        reply = json.loads(operator.received("oteo/reply/operator/1")[0])
        assert reply["op"] == "score" and reply["id"] == "req-1", reply

        m = daemon.metrics()
        assert m("oteo_mqtt_connected") == 1
        assert m("oteo_mqtt_connect_failures_total", reason="not_authorized") == 0
        assert m("oteo_mqtt_connect_failures_total", reason="bad_credentials") == 0
        assert "refused subscriptions" not in daemon.log_text(), daemon.log_text()
        # The ops API needs the token from secrets/http-token (a token_file makes it required
        # on loopback too); /healthz, /readyz and /metrics do not.
        assert daemon.post_json("/v1/ops/score", {"windows": []})[0] == 401
        token = (DEPLOY / "secrets" / "http-token").read_text().strip()
        request = urllib.request.Request(
            f"{daemon.base_url}/v1/ops/score",
            data=json.dumps({"windows": []}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 400, "with the token the request is read (and refused)"
        assert daemon.get("/healthz")[0] == 200
        assert daemon.stop() == 0
    finally:
        daemon.kill()
