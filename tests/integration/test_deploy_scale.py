"""The scaled-out deploy files agree with each other, checked with the real parsers.

- deploy/compose.scale.yaml: Debian's `docker-compose config -q`; three NATS nodes sharing the
  alias oteo's mqtt.url names; one oteo service per partition index, 0..of-1, each with its own
  name, state volume and scrape target; the mounted files exist.
- deploy/nats/nats.conf, deploy/scale/local/nats-*.conf and the Kubernetes ConfigMap's copy:
  `nats-server -t`; routes reach every node; the mapping's partition count and prefix are the
  oteo config's; ack_wait is not longer than redelivery_wait_s.
- deploy/k8s/*.yaml (PyYAML): the StatefulSet's pod-index label reaches OTEO_PARTITION_INDEX,
  replicas equal [partitions] of, Services select the pods and expose the ports the configs use,
  the ConfigMap's oteo.toml is deploy/scale/oteo.toml; every config passes `oteo check-config`.
- deploy/scale/run-local: `bash -n`, its --check mode, and a real run on loopback.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from host_program import require
from test_deploy import bind_mounts, load_yaml, ok, run

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
    assert nats["ack_wait_s"] <= parts["redelivery_wait_s"], "redelivery_wait_s < ack_wait"
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
        assert service["command"] == ["run", "--config", "/etc/oteo/oteo.toml"]
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
