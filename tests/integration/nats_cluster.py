"""A real 3-node nats-server cluster on loopback: JetStream, the MQTT listener and the mapping.

Each node gets free loopback ports (client, cluster route, MQTT, HTTP monitoring), a store
directory and a log under the given directory. `start()` waits until JetStream has a meta
leader (the monitoring endpoint /jsz) and every MQTT listener accepts connections; `kill(i)` is
a kill -9 of one node, `restart(i)` brings it back with its store, `stop()` ends them all.

Facts this is built on (nats-server 2.9, Debian's `nats-server`): MQTT 3.1.1 only; the MQTT
listener needs JetStream and a `server_name`; a clustered JetStream with 3 nodes keeps the MQTT
streams on 3 replicas, so all three must be up at the start. The mapping puts a reading
published on `sensors/<id>/data` on `part/<k>/sensors/<id>/data`, k = FNV-1a 32 of <id> mod P.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from daemon_harness import free_port
from host_program import require

from daemon.partition import nats_mapping

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLUSTER_NAME = "oteo"


@dataclass
class NatsNode:
    """One nats-server of the cluster: its ports, files and process."""

    name: str
    directory: Path
    host = "127.0.0.1"  # (a class attribute) where every port listens
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.directory / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[int], partitions: int, ack_wait_s: float) -> str:
        route_urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
        store = self.directory / f"{self.name}-store"
        return "\n".join(
            [
                f"server_name: {self.name}",
                f"listen: 127.0.0.1:{self.client_port}",
                f"http: 127.0.0.1:{self.http_port}",
                f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, '
                "max_file_store: 1GB }",
                f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{self.cluster_port}, "
                f"routes: [{route_urls}] }}",
                f'mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, ack_wait: "{ack_wait_s:g}s" }}',
                f"mappings = {{ {nats_mapping(partitions)} }}",
                "",
            ]
        )

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [require("nats-server"), "-c", str(self.conf_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """kill -9: no goodbye to the cluster or the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def jsz(self, query: str = "") -> dict[str, Any] | None:
        """The monitoring endpoint's JetStream report, or None while it does not answer."""
        url = f"http://127.0.0.1:{self.http_port}/jsz{query}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                doc: dict[str, Any] = json.load(response)
                return doc
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def subscribed_partitions(self) -> set[int]:
        """Partitions with a QoS 1 MQTT subscription whose consumer has a leader (readings of
        the others are not stored yet): training/bench/fleet.py's reading of /jsz."""
        from training.bench.fleet import subscribed_partitions

        return subscribed_partitions(
            self.jsz("?accounts=true&streams=true&consumers=true&config=true") or {}
        )

    def meta_leader(self) -> str | None:
        doc = self.jsz()
        meta = doc.get("meta_cluster") if doc else None
        leader = meta.get("leader") if isinstance(meta, dict) else None
        return str(leader) if leader else None

    def mqtt_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=1):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """Three (or `size`) nats-server nodes routed to each other, JetStream clustered."""

    def __init__(
        self, directory: Path, size: int = 3, partitions: int = 16, ack_wait_s: float = 30.0
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.partitions = partitions
        self.ack_wait_s = ack_wait_s
        self.nodes = [NatsNode(f"n{i + 1}", directory) for i in range(size)]
        routes = [node.cluster_port for node in self.nodes]
        for node in self.nodes:
            node.conf_path.write_text(node.config(routes, partitions, ack_wait_s))

    @property
    def mqtt_ports(self) -> list[int]:
        return [node.mqtt_port for node in self.nodes]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Every running node sees the same JetStream meta leader and accepts MQTT."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [node for node in self.nodes if node.running]
            dead = [node.name for node in self.nodes if node.process and not node.running]
            leaders = {node.meta_leader() for node in running}
            agreed = len(leaders) == 1 and None not in leaders
            if agreed and all(node.mqtt_accepts() for node in running):
                return str(leaders.pop())
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log_text()[-1500:]}" for n in self.nodes)
                raise AssertionError(
                    f"no JetStream meta leader agreed on within {timeout_s} s "
                    f"(leaders {leaders}, not running {dead})\n{logs}"
                )
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int, timeout_s: float = START_TIMEOUT_S) -> None:
        self.nodes[index].start()
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def running_cluster(
    directory: Path, size: int = 3, partitions: int = 16, ack_wait_s: float = 30.0
) -> Iterator[NatsCluster]:
    """A started cluster, stopped (every node, even after a failure) when the block ends."""
    cluster = NatsCluster(directory, size, partitions, ack_wait_s)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
