"""The scaled-out deploy files agree with each other, checked with the real parsers.

- deploy/compose.scale.yaml: Debian's `docker-compose config -q`; three NATS nodes sharing the
  alias oteo's mqtt.url names; one oteo service per partition index, 0..of-1, each with its own
  name, state volume and scrape target; the mounted files exist.
- deploy/nats/nats.conf, deploy/scale/local/nats-*.conf and the Kubernetes ConfigMap's copy:
  `nats-server -t`; routes reach every node; the mapping's partition count and prefix are the
  oteo config's; redelivery_wait_s is ack_wait plus a margin of at least 10 s.
- deploy/k8s/*.yaml (PyYAML): the StatefulSet's pod-index label reaches OTEO_PARTITION_INDEX,
  replicas equal [partitions] of, Services select the pods and expose the ports the configs use,
  the ConfigMap's oteo.toml is deploy/scale/oteo.toml; every config passes `oteo check-config`.
- deploy/scale/run-local: `bash -n`, its --check mode, and a real run on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from daemon_harness import Metrics, oteo_command, reading, run_oteo, wait_until
from host_program import SBIN, require
from nats_cluster import NatsNode
from nats_kit import MqttPublisher
from test_deploy import bind_mounts, load_yaml, ok, private_copy, run

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.scale.yaml"
NATS_CONF = DEPLOY / "nats" / "nats.conf"
SCALE_TOML = DEPLOY / "scale" / "oteo.toml"
LOCAL = DEPLOY / "scale" / "local"
RUN_LOCAL = DEPLOY / "scale" / "run-local"
K8S = DEPLOY / "k8s"


# -- reading nats-server configs (only the settings these checks need) ----------------------


def nats_settings(text: str) -> dict[str, Any]:
    """The mapping, MQTT listener, ack_wait, routes and cluster listener of a nats config."""
    mapping = re.search(
        r'"sensors\.\*\.data"\s*:\s*"(\w+)\.\{\{partition\((\d+),1\)\}\}\.sensors\.'
        r'\{\{wildcard\(1\)\}\}\.data"',
        text,
    )
    assert mapping, "no partition mapping for sensors.*.data"
    mqtt = re.search(r"mqtt\s*\{([^}]*)\}", text, re.S)
    cluster = re.search(r"cluster\s*\{(.*?)\n\}", text, re.S)
    assert mqtt and cluster, "no mqtt or cluster block"
    listen = re.search(r"listen:\s*(\S+)", mqtt.group(1))
    ack_wait = re.search(r'ack_wait:\s*"(\d+)s"', mqtt.group(1))
    cluster_listen = re.search(r"listen:\s*(\S+)", cluster.group(1))
    assert listen and ack_wait and cluster_listen
    assert "jetstream" in text and re.search(r"^server_name:", text, re.M)
    return {
        "prefix": mapping.group(1),
        "partitions": int(mapping.group(2)),
        "mqtt_listen": listen.group(1),
        "ack_wait_s": float(ack_wait.group(1)),
        "routes": re.findall(r"nats-route://(\S+?)(?:,|\s|\])", cluster.group(1)),
        "cluster_listen": cluster_listen.group(1),
    }


def nats_check(path: Path, **env: str) -> None:
    result = subprocess.run(
        [require("nats-server"), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 0 and "is valid" in result.stderr, result.stderr


def assert_agrees(nats: dict[str, Any], oteo: dict[str, Any]) -> None:
    """The broker's mapping and the daemons' [partitions] describe the same partitions."""
    parts = oteo["partitions"]
    assert nats["partitions"] == parts["count"], "mapping partition(P) != [partitions] count"
    assert nats["prefix"] == parts["topic_prefix"], "mapping prefix != [partitions] topic_prefix"
    assert oteo["topics"]["input_prefix"] == "sensors"
    # The broker goes on delivering to a killed instance for seconds (docs/scale-out.md).
    margin = parts["redelivery_wait_s"] - nats["ack_wait_s"]
    assert margin >= 10, f"redelivery_wait_s is ack_wait + {margin:g} s: give it 10 s or more"
    assert oteo["mqtt"]["protocol"] == "3.1.1"


# -- compose ----------------------------------------------------------------------------------


def test_scale_compose_parses() -> None:
    ok(run(require("docker-compose"), "-f", str(COMPOSE), "config", "-q"))


def test_scale_compose_instances_nodes_and_scrapes_agree() -> None:
    services = load_yaml(COMPOSE)["services"]
    volumes = load_yaml(COMPOSE)["volumes"]
    for name, service in services.items():
        assert re.search(r":v?\d", service["image"]), f"{name}: image not pinned"
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name}: {source} -> {target} does not exist"
    nodes = sorted(name for name in services if name.startswith("nats-"))
    oteos = sorted(name for name in services if name.startswith("oteo-"))
    assert nodes == ["nats-0", "nats-1", "nats-2"]
    config = tomllib.loads(SCALE_TOML.read_text(encoding="utf-8"))
    assert len(oteos) == config["partitions"]["of"], "one oteo service per partition index"

    nats = nats_settings(NATS_CONF.read_text(encoding="utf-8"))
    assert_agrees(nats, config)
    assert sorted(nats["routes"]) == [f"{node}:6222" for node in nodes]
    url = re.fullmatch(r"mqtt://([\w-]+):(\d+)", config["mqtt"]["url"])
    assert url and nats["mqtt_listen"].endswith(f":{url.group(2)}")
    for node in nodes:
        service = services[node]
        assert service["environment"]["SERVER_NAME"] == node
        assert url.group(1) in service["networks"]["default"]["aliases"], f"{node} lacks alias"
        assert ("/etc/nats/nats.conf", NATS_CONF) in [
            (target, source) for source, target in bind_mounts(service)
        ]
        assert service["command"] == ["-c", "/etc/nats/nats.conf"]
        data = [v for v in service["volumes"] if v.endswith(":/data")]
        assert data and data[0].split(":")[0] in volumes
        nats_check(NATS_CONF, SERVER_NAME=node)

    indices, states = [], set()
    for name in oteos:
        service = services[name]
        env = service["environment"]
        indices.append(int(env["OTEO_PARTITION_INDEX"]))
        assert env["OTEO_INSTANCE"] == name
        mounts = dict((target, source) for source, target in bind_mounts(service))
        assert mounts["/etc/oteo/oteo.toml"] == SCALE_TOML
        assert (mounts["/models"] / Path(config["model"]["path"]).name).is_file()
        state = [v.split(":")[0] for v in service["volumes"] if v.endswith(config["state_dir"])]
        assert state and state[0] in volumes
        states.add(state[0])
        assert tuple(service["command"]) == ("run", "--config", "/etc/oteo/oteo.toml")
    assert sorted(indices) == list(range(len(oteos))), "indices must be 0..of-1, each once"
    assert len(states) == len(oteos), "instances must not share a state volume"

    prometheus = services["prometheus"]
    mounts = dict((target, source) for source, target in bind_mounts(prometheus))
    scrape = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = sorted(t for sc in jobs["oteo"]["static_configs"] for t in sc["targets"])
    port = config["http"]["port"]
    assert targets == [f"{name}:{port}" for name in oteos]
    assert mounts["/etc/prometheus/rules.yml"] == DEPLOY / "prometheus" / "rules.yml"


def test_scale_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """As the container sees it: rules.yml beside prometheus.yml."""
    (tmp_path / "prometheus.yml").write_bytes((DEPLOY / "scale" / "prometheus.yml").read_bytes())
    (tmp_path / "rules.yml").write_bytes((DEPLOY / "prometheus" / "rules.yml").read_bytes())
    out = ok(run(require("promtool"), "check", "config", str(tmp_path / "prometheus.yml")))
    assert "1 rule files found" in out, out


# -- Kubernetes -------------------------------------------------------------------------------


def k8s_docs(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    import yaml

    text = (K8S / name).read_text(encoding="utf-8")
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def pod_spec(statefulset: dict[str, Any]) -> dict[str, Any]:
    spec = statefulset["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


def selects(selector_owner: dict[str, Any], statefulset: dict[str, Any]) -> bool:
    """A Service's (or PodDisruptionBudget's) selector matches the StatefulSet's pods."""
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selector = selector_owner["spec"]["selector"]
    return bool(selector.get("matchLabels", selector).items() <= labels.items())


def test_k8s_oteo_statefulset_takes_its_index_from_the_pod_index(tmp_path: Path) -> None:
    docs = k8s_docs("oteo.yaml")
    nats_docs = k8s_docs("nats.yaml")
    sts = docs[("StatefulSet", "oteo")]
    toml_text = docs[("ConfigMap", "oteo-config")]["data"]["oteo.toml"]
    assert toml_text == SCALE_TOML.read_text(encoding="utf-8"), "ConfigMap != scale/oteo.toml"
    config = tomllib.loads(toml_text)
    assert sts["spec"]["replicas"] == config["partitions"]["of"]
    headless = docs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None" and selects(headless, sts)
    pod = pod_spec(sts)
    (container,) = pod["containers"]
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]}
    assert env["OTEO_PARTITION_INDEX"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["OTEO_INSTANCE"] == "metadata.name"
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == str(config_path.parent)
    assert (
        volumes["config"]["configMap"]["name"] == "oteo-config"
        and config_path.name in (docs[("ConfigMap", "oteo-config")]["data"])
    )
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert "state" in claims and mounts["state"] == config["state_dir"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config["http"]["port"]
    assert {p["port"] for p in headless["spec"]["ports"]} == {config["http"]["port"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert selects(docs[("PodDisruptionBudget", "oteo")], sts)
    # oteo's url names the NATS client Service, on its MQTT port.
    url = re.fullmatch(r"mqtt://([\w-]+):(\d+)", config["mqtt"]["url"])
    assert url
    service = nats_docs[("Service", url.group(1))]
    assert int(url.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    assert selects(service, nats_docs[("StatefulSet", "nats")])


def test_k8s_nats_statefulset_forms_a_3_node_cluster(tmp_path: Path) -> None:
    docs = k8s_docs("nats.yaml")
    sts = docs[("StatefulSet", "nats")]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    text = docs[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    nats = nats_settings(text)
    assert_agrees(nats, tomllib.loads(SCALE_TOML.read_text(encoding="utf-8")))
    headless = docs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert sorted(nats["routes"]) == [
        f"nats-{i}.{headless['metadata']['name']}:6222" for i in range(3)
    ]
    pod = pod_spec(sts)
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert nats["mqtt_listen"].endswith(f":{ports['mqtt']}")
    assert nats["cluster_listen"].endswith(f":{ports['cluster']}")
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]}
    assert env == {"SERVER_NAME": "metadata.name"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"] == ["-c", f"{mounts['config']}/nats.conf"]
    assert re.search(rf'store_dir:\s*"{mounts["data"]}"', text)
    assert selects(docs[("PodDisruptionBudget", "nats")], sts)
    assert docs[("PodDisruptionBudget", "nats")]["spec"]["maxUnavailable"] == 1
    copy = tmp_path / "nats.conf"
    copy.write_text(text, encoding="utf-8")
    nats_check(copy, SERVER_NAME="nats-0")


# -- the local run (no container engine) -----------------------------------------------------


def test_local_nats_configs_form_one_cluster_on_loopback() -> None:
    config = tomllib.loads((LOCAL / "oteo.toml").read_text(encoding="utf-8"))
    nodes = [nats_settings((LOCAL / f"nats-{i}.conf").read_text()) for i in range(3)]
    for i, node in enumerate(nodes):
        assert_agrees(node, config)
        assert sorted(node["routes"]) == sorted(n["cluster_listen"] for n in nodes)
        assert node["mqtt_listen"].startswith("127.0.0.1:")
        nats_check(LOCAL / f"nats-{i}.conf", NATS_STORE="/nonexistent/store")
    assert config["mqtt"]["url"] == f"mqtt://{nodes[0]['mqtt_listen']}"
    scrape = load_yaml(LOCAL / "prometheus.yml")
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{9110 + i}" for i in range(config["partitions"]["of"])]
    ok(run(require("promtool"), "check", "config", str(LOCAL / "prometheus.yml")))


def test_run_local_is_valid_bash_and_refuses_bad_arguments() -> None:
    ok(run("bash", "-n", str(RUN_LOCAL)))
    assert os.access(RUN_LOCAL, os.X_OK), "run-local must be executable"
    for args, message in (
        (["--instances", "0"], "--instances: give 1..16"),
        (["--bogus"], "unknown argument: --bogus"),
    ):
        result = run(str(RUN_LOCAL), *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_scale_container_config_passes_check_config(tmp_path: Path) -> None:
    """deploy/scale/oteo.toml as a container sees it (secrets, /models, state rewritten), and
    the token file it names is a mounted secret in compose and in Kubernetes."""
    text = SCALE_TOML.read_text(encoding="utf-8")
    config = tomllib.loads(text)
    token = config["http"]["token_file"]
    assert token == "/run/secrets/http-token"
    for name in ("oteo-0", "oteo-1"):
        assert "http-token" in load_yaml(COMPOSE)["services"][name]["secrets"]
    sts = k8s_docs("oteo.yaml")[("StatefulSet", "oteo")]
    (container,) = pod_spec(sts)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret = {v["name"]: v for v in pod_spec(sts)["volumes"]}["secrets"]["secret"]
    assert mounts["secrets"] == str(Path(token).parent) and secret["defaultMode"] & 0o004 == 0

    text = text.replace(token, str(private_copy(DEPLOY / "secrets" / "http-token", tmp_path)))
    text = text.replace('"/models/', f'"{REPO / "models"}/')
    text = text.replace(f'"{config["state_dir"]}"', f'"{tmp_path / "state"}"')
    (tmp_path / "oteo.toml").write_text(text, encoding="utf-8")
    result = run_oteo("check-config", str(tmp_path / "oteo.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"count": 16' in result.stdout and '"of": 2' in result.stdout, result.stdout


def run_local_env() -> dict[str, str]:
    """PATH with this environment's `oteo` and Debian's sbin programs (nats-server) first."""
    bin_dir = str(Path(oteo_command()[0]).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, *SBIN, os.environ["PATH"]])}


def test_run_local_check_validates_its_configs(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(RUN_LOCAL), "--check", "--instances", "3", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=run_local_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configs valid (3 NATS nodes, 3 oteo instances" in result.stdout
    assert "of = 3" in (tmp_path / "oteo.toml").read_text()
    scrape = load_yaml(tmp_path / "prometheus.yml")
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9110", "127.0.0.1:9111", "127.0.0.1:9112"]


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_run_local_serves_every_partition_once_and_prometheus_scrapes_it(tmp_path: Path) -> None:
    """The real run on the committed loopback ports: 3 NATS nodes, 2 instances, Prometheus.
    Each partition is owned by exactly one instance, readings of 20 streams are all scored,
    Prometheus sees both instances up, and SIGTERM stops everything cleanly."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [str(RUN_LOCAL), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=run_local_env(),
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{9110 + i}" for i in range(2)]

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in run_dir.glob("*.log"))

    try:

        def ready() -> bool:
            try:
                return all(
                    urllib.request.urlopen(f"{u}/readyz", timeout=2).status == 200 for u in urls
                )
            except OSError:
                return False

        assert wait_until(ready, 60), f"instances not ready\n{logs()}"

        def owned() -> dict[str, float]:
            found: dict[str, float] = {}
            for url in urls:
                with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                    metrics = Metrics(response.read().decode())
                for labels, value in metrics.series("oteo_partition_owned"):
                    found[labels["partition"]] = found.get(labels["partition"], 0) + value
            return found

        assert wait_until(lambda: owned() == {str(k): 1.0 for k in range(16)}, 30), owned()
        node = NatsNode("nats-0", run_dir, client_port=14220, mqtt_port=11883, http_port=18220)
        # Connected is not yet subscribed: a reading published before its partition's
        # subscription exists is not stored (run-local waits for the same before it says ready).
        assert wait_until(lambda: node.subscribed_partitions() == set(range(16)), 30), logs()
        publisher = MqttPublisher(node)  # type: ignore[arg-type]
        streams = [f"local-{i}" for i in range(20)]
        for n in range(5):
            for stream in streams:
                publisher.send(f"sensors/{stream}/data", reading(1_767_225_600 + n, [1.0] * 8, n))
        publisher.close()

        def scored() -> float:
            total = 0.0
            for url in urls:
                with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                    total += Metrics(response.read().decode()).get("oteo_readings_total")
            return total

        assert wait_until(lambda: scored() == 100, 30), f"{scored()} of 100 readings\n{logs()}"

        def both_up() -> bool:
            try:
                doc = http_json("http://127.0.0.1:9090/api/v1/query?query=up%7Bjob%3D%22oteo%22%7D")
            except OSError:
                return False
            return sorted(r["value"][1] for r in doc["data"]["result"]) == ["1", "1"]

        assert wait_until(both_up, 30), f"Prometheus does not see both instances up\n{logs()}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0].decode()
    assert process.returncode == 0, output
    assert "run-local: stopping" in output
