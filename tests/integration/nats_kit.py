"""A real nats-server for partition tests: JetStream, an MQTT listener and the partition mapping.

One process on free loopback ports, its config, store and log in a test's directory. The mapping
puts `sensors/<id>/data` on `part/<k>/sensors/<id>/data`, k = FNV-1a 32 of the id mod `count`.
`ack_wait` is short, so that unacknowledged messages come back within a test's patience.
`MqttPublisher` publishes with MQTT 3.1.1 (nats-server refuses MQTT 5) from its own thread.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

import paho.mqtt.client as paho
from daemon_harness import free_port, wait_until
from host_program import require
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.partition import nats_mapping

START_TIMEOUT_S = 10.0


class NatsServer:
    """One nats-server process; `restart()` keeps its ports, config and store."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, *, count: int, ack_wait_s: float = 3.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.count = count
        self.port = free_port()  # NATS clients
        self.mqtt_port = free_port()
        self.conf_path = directory / "nats.conf"
        self.log_path = directory / "nats.log"
        self.conf_path.write_text(
            "\n".join(
                [
                    'server_name: "oteo-test"',
                    f"listen: {self.host}:{self.port}",
                    f'jetstream {{ store_dir: "{directory / "store"}" }}',
                    f'mqtt {{ listen: {self.host}:{self.mqtt_port}, ack_wait: "{ack_wait_s:g}s" }}',
                    f"mappings = {{ {nats_mapping(count)} }}",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The MQTT listener, as the daemon's mqtt.url."""
        return f"mqtt://{self.host}:{self.mqtt_port}"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [require("nats-server"), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        ready = wait_until(self._mqtt_ready, START_TIMEOUT_S, 0.1)
        if not ready:
            self.stop()
            raise AssertionError(f"nats-server did not start:\n{self.log_text()[-3000:]}")

    def _mqtt_ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"nats-server exited:\n{self.log_text()[-3000:]}")
        return "Server is ready" in self.log_text()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def mqtt_client(
    server: NatsServer, client_id: str = "", *, persistent: bool = False
) -> paho.Client:
    """A connected MQTT 3.1.1 client with its network thread running."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.connect(server.host, server.mqtt_port, keepalive=10)
    client.loop_start()
    assert wait_until(client.is_connected, 5.0), "MQTT client did not connect to nats-server"
    return client


class MqttPublisher:
    """QoS 1 publishing over MQTT 3.1.1 from the calling thread, which also runs paho's loop
    (QoS 1 publishing from another thread than paho's stalls: shared/notes/onnx-export.md)."""

    def __init__(self, server: NatsServer, max_inflight: int = 200) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self._max_inflight = max_inflight
        self._unacked: set[int] = set()
        self.client.on_publish = lambda _c, _u, mid, *_: self._unacked.discard(mid)
        self.client.connect(server.host, server.mqtt_port, keepalive=10)
        deadline = time.monotonic() + 5
        while not self.client.is_connected():
            assert time.monotonic() < deadline, "publisher did not connect to nats-server"
            self.client.loop(0.05)

    def send(self, topic: str, payload: bytes) -> None:
        """Queue one message; waits (running the loop) while too many are unacknowledged."""
        deadline = time.monotonic() + 30
        while len(self._unacked) >= self._max_inflight:
            assert time.monotonic() < deadline, "publisher stalled: no PUBACKs for 30 s"
            self.client.loop(0.01)
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish refused: {info.rc}"
        self._unacked.add(info.mid)
        self.client.loop(0.0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Run the loop until nats-server acknowledged every message."""
        deadline = time.monotonic() + timeout_s
        while self._unacked:
            assert time.monotonic() < deadline, f"{len(self._unacked)} publishes not acknowledged"
            self.client.loop(0.01)

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop(0.05)
