"""Run the real `oteo run` as a subprocess and talk to it over HTTP and a real Mosquitto.

`OteoProcess` writes a config, starts the daemon, waits for /readyz, reads /metrics and stops it
with a signal. `Watcher` subscribes to what the daemon publishes; `Publisher` sends readings and
requests from ONE thread that also runs its paho loop (QoS 1 publishing from a thread other than
paho's network thread stalls here, see /work/shared/notes/onnx-export.md).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; returns its last value (falsy on time-out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def oteo_command(*args: str) -> list[str]:
    """The `oteo` console script beside this interpreter, else the click entry point."""
    script = Path(sys.executable).with_name("oteo")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from daemon.cli import main; main()", *args]


def run_oteo(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one `oteo` command to completion, capturing its output."""
    return subprocess.run(
        oteo_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def toml_text(doc: dict[str, Any]) -> str:
    """Enough TOML for our configs: top-level scalars, then one level of tables."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {scalar(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(str(value))

    lines = [f"{k} = {scalar(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {scalar(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def daemon_config(
    directory: Path, broker_url: str, model: Path, instance: str | None = None, **sections: Any
) -> dict[str, Any]:
    """A config for a test daemon: its own state dir, a free HTTP port, fast reconnects."""
    doc: dict[str, Any] = {
        "instance": instance or f"t{uuid.uuid4().hex[:10]}",
        "state_dir": str(directory / "state"),
        "model": {"path": str(model)},
        "mqtt": {
            "url": broker_url,
            "keepalive_s": 5,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 0.5,
        },
        "http": {"bind": "127.0.0.1", "port": free_port()},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            doc.setdefault(name, {}).update(values)
        else:
            doc[name] = values
    return doc


class Metrics:
    """One /metrics scrape: samples by name (with the _total/_bucket suffix) and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def __call__(self, name: str, **labels: str) -> float:
        """The value of the sample with exactly these labels; KeyError if there is none."""
        for sample_name, sample_labels, value in self.samples:
            if sample_name == name and sample_labels == labels:
                return value
        raise KeyError(f"no sample {name}{labels or ''} in /metrics")

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        try:
            return self(name, **labels)
        except KeyError:
            return default

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, value) for n, labels, value in self.samples if n == name]


class OteoProcess:
    """The daemon as a subprocess of the test, with its config, HTTP port and stderr log."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        self.config_path = directory / "oteo.toml"
        self.log_path = directory / "oteo.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.write_config()

    @property
    def instance(self) -> str:
        return str(self.config["instance"])

    @property
    def port(self) -> int:
        return int(self.config["http"]["port"])

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.sqlite3"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.config_path.write_text(toml_text(self.config), encoding="utf-8")

    # -- process ---------------------------------------------------------------------------

    def start(self, *, wait: str | None = "/readyz", timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start `oteo run --config`; wait (bounded) until `wait` answers 200."""
        assert not self.running, "already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self.proc = subprocess.Popen(
            oteo_command("run", "--config", str(self.config_path)),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        if wait is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"oteo exited with {self.proc.returncode} before {wait} was 200")
            if self.get(wait, timeout_s=1.0)[0] == 200:
                return
            time.sleep(0.05)
        self.kill()
        self._fail(f"oteo did not answer 200 on {wait} within {timeout_s} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send `signum` and wait (bounded) for the exit code."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait (bounded) for the process to exit on its own; its exit code."""
        assert self.proc is not None, "not started"
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            self._fail(f"oteo did not exit within {timeout_s} s")
        self._reap()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reap()

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _fail(self, message: str) -> None:
        raise AssertionError(f"{message}\n--- oteo stderr ---\n{self.log_text()[-6000:]}")

    # -- HTTP ------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 5.0
    ) -> tuple[int, bytes]:
        """(status, body); status 0 when nothing answers."""
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        return self.request("GET", path, timeout_s=timeout_s)

    def post_json(self, path: str, doc: Any) -> tuple[int, Any]:
        status, body = self.request("POST", path, json.dumps(doc).encode())
        return status, json.loads(body) if body else None

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        if status != 200:
            self._fail(f"/metrics answered {status}")
        return Metrics(body.decode())

    def wait_metric(
        self,
        check: Callable[[Metrics], bool],
        timeout_s: float = 10.0,
        what: str = "metric condition",
    ) -> Metrics:
        """Scrape until `check(metrics)` holds (bounded); fails with the last scrape."""
        last: list[Metrics] = []

        def ok() -> bool:
            last[:] = [self.metrics()]
            return check(last[0])

        if not wait_until(ok, timeout_s, interval_s=0.1):
            oteo = [
                line
                for line in last[0].text.splitlines()
                if line.startswith("oteo_")
                and not any(skip in line for skip in ("_created", "_bucket", " 0.0"))
            ]
            self._fail(f"timed out waiting for {what}; last scrape:\n" + "\n".join(oteo[:200]))
        return last[0]


# -- MQTT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """A paho subscriber on its own network thread (it only subscribes: no QoS 1 publishing)."""

    def __init__(
        self,
        host: str,
        port: int,
        topics: Sequence[tuple[str, int]],
        *,
        client_id: str = "",
        persistent: bool = False,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.reconnect_delay_set(0.2, 0.5)

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(list(topics))

        def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(
                    Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties)
                )

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect(host, port, keepalive=5, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(5), "watcher did not get its SUBACK"

    def all(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def docs(self, topic: str) -> list[Any]:
        return [m.json() for m in self.all(topic) if m.payload]

    def wait_for(
        self, predicate: Callable[[list[Received]], Any], timeout_s: float = 10.0, what: str = ""
    ) -> Any:
        value = wait_until(lambda: predicate(self.all()), timeout_s)
        if not value:
            seen = "\n".join(f"{m.topic} {m.payload[:300]!r}" for m in self.all()[-30:])
            raise AssertionError(f"timed out waiting for {what or 'messages'}; last seen:\n{seen}")
        return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """Publishes from the calling thread, running the paho loop in between (never loop_start)."""

    def __init__(self, host: str, port: int, max_inflight: int = 200) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self._max_inflight = max_inflight
        self._unacked: set[int] = set()
        self.client.on_publish = lambda _c, _u, mid, *_: self._unacked.discard(mid)
        self.client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + 5
        while not self.client.is_connected():
            assert time.monotonic() < deadline, "publisher did not connect"
            self.client.loop(0.05)

    def send(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        properties: Properties | None = None,
    ) -> None:
        """Queue one message; waits (running the loop) while too many are unacknowledged."""
        deadline = time.monotonic() + 30
        while len(self._unacked) >= self._max_inflight:
            assert time.monotonic() < deadline, "publisher stalled: no PUBACKs for 30 s"
            self.client.loop(0.01)
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish refused: {info.rc}"
        if qos > 0:
            self._unacked.add(info.mid)
        self.client.loop(0.0)

    def send_all(self, items: Iterable[tuple[str, bytes | str]], qos: int = 1) -> int:
        count = 0
        for topic, payload in items:
            self.send(topic, payload, qos=qos)
            count += 1
        self.flush()
        return count

    def flush(self, timeout_s: float = 30.0) -> None:
        """Run the loop until the broker acknowledged every QoS 1 message."""
        deadline = time.monotonic() + timeout_s
        while self._unacked:
            assert time.monotonic() < deadline, f"{len(self._unacked)} publishes not acknowledged"
            self.client.loop(0.01)

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        if self.client.is_connected():
            self.client.disconnect()
            self.client.loop(0.05)


def reading(ts: float, values: Sequence[float], seq: int | None = None) -> bytes:
    doc: dict[str, Any] = {"ts": ts, "values": [round(float(v), 5) for v in values]}
    if seq is not None:
        doc["seq"] = seq
    return json.dumps(doc).encode()


def batched_readings(
    stream: str, values: np.ndarray, t0: float, batch: int
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of `values` [T, C] one second apart from t0, `batch` readings a message."""
    for i in range(0, len(values), batch):
        doc = [
            {"ts": t0 + i + j, "values": [round(float(v), 5) for v in row]}
            for j, row in enumerate(values[i : i + batch])
        ]
        yield f"sensors/{stream}/data", json.dumps(doc).encode()


def v5_request_properties(
    response_topic: str | None, correlation: bytes | None = None
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props
