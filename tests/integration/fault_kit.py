"""Tools for the reliability and security suites (issue 6), on top of `daemon_harness`.

- `Fleet`: daemons (`OteoProcess`) on any broker, killed at teardown.
- `StreamPublisher`: a device publishing sequenced readings from its own thread (paho used from
  that thread only), at a rate or as fast as it can, that survives broker restarts the way a
  real at-least-once device does: it reconnects and publishes again whatever the broker had not
  acknowledged.
- `NetNs`: a network namespace of our own (`unshare -n`), entered by the calling thread with
  setns(2), so that everything started from it (Mosquitto, the daemon, paho threads) shares a
  loopback that can be taken down: a half-open TCP partition without tc or iptables.
- Event accounting (`event_key`), outbox reading, process memory (`rss_kib`), log timestamps.

Data: every reading is the demo model's channel means plus a small deterministic wiggle, one
sample period apart in data time, however fast it is published. `EVENTFUL` alarm overrides make
every window exceed: each stream raises one alarm after `k` windows, then an `update` event
every 60 s of data time, so events are produced at a steady, known pace.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from daemon_harness import OteoProcess, Publisher, Watcher, daemon_config
from host_program import require
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.manifest import Manifest
from daemon.model import Model

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: data time of a stream's first reading
# Thresholds that do not move with the stream (baseline_samples, new_level_s 0): every window
# exceeds, for as long as the stream runs.
EVENTFUL = {
    "enter_threshold": 1e-6,
    "exit_threshold": 1e-7,
    "baseline_samples": 0,
    "new_level_s": 0,
}
EVENT_UPDATE_S = 60  # daemon/engine.py: an alarm repeats an update event every 60 s of data


@functools.cache
def demo_manifest() -> Manifest:
    return Model.load(DEMO_MODEL).manifest


def rows(n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Readings [n, C] starting at sample `start`: channel means plus a small wiggle."""
    m = demo_manifest()
    mean = np.asarray(m.channel_mean)
    scale = np.asarray(m.channel_scale)
    i = np.arange(start, start + n)[:, None]
    c = np.arange(len(mean))[None, :]
    return np.round(mean + 0.1 * scale * np.sin(0.3 * i + c + seed), 4)


def reading(ts: float, values: Sequence[float], seq: int | None = None) -> bytes:
    doc: dict[str, Any] = {"ts": ts, "values": [float(v) for v in values]}
    if seq is not None:
        doc["seq"] = seq
    return json.dumps(doc).encode()


def readings_for(stream: str, n: int, *, start: int = 0, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` sequenced readings of `stream` from sample `start` (seq = sample index)."""
    values = rows(n, seed, start)
    return [
        (f"sensors/{stream}/data", reading(T0 + start + i, values[i], seq=start + i))
        for i in range(n)
    ]


def interleave(*streams: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Row by row across streams, as machines publishing side by side would."""
    return [item for row in zip(*streams, strict=True) for item in row]


def windows_for(readings: int, manifest: Manifest | None = None) -> int:
    m = manifest or demo_manifest()
    return 0 if readings < m.window else (readings - m.window) // m.alarm.hop + 1


# -- daemons -----------------------------------------------------------------------------------


class Fleet:
    """Daemons on any broker: `fleet(broker_url, **sections)`; every one is killed at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: list[OteoProcess] = []

    def __call__(
        self,
        broker_url: str,
        *,
        start: bool = True,
        wait: str | None = "/readyz",
        model: Path = DEMO_MODEL,
        **sections: Any,
    ) -> OteoProcess:
        directory = self.directory / f"oteo{len(self.made)}"
        directory.mkdir()
        proc = OteoProcess(directory, daemon_config(directory, broker_url, model, **sections))
        self.made.append(proc)
        if start:
            proc.start(wait=wait)
        return proc

    def close(self) -> None:
        for proc in self.made:
            proc.kill()


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now and its peak so far."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


class MemorySampler(threading.Thread):
    """Samples a process's RSS every `interval_s` until stopped; `peak_kib`, `samples`."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(rss_kib(self.pid)[0])
            self._halt.wait(self.interval_s)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return max(self.samples) if self.samples else 0


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_lines(text: str, needle: str) -> list[tuple[float, str]]:
    """(unix time, line) of the daemon's log lines that contain `needle` (local time stamps)."""
    out = []
    for line in text.splitlines():
        match = _LOG_TIME.match(line)
        if match and needle in line:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((stamp, line))
    return out


# -- events and the outbox -------------------------------------------------------------------------


def event_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    """What identifies one event: its alarm, its kind and its window's time."""
    return (doc["event_id"], doc["kind"], doc["ts"])


def event_docs(watcher: Watcher) -> list[dict[str, Any]]:
    """Every event message the watcher received, in arrival order (redeliveries included)."""
    return [m.json() for m in watcher.all() if m.topic.endswith("/event") and m.payload]


def outbox_entries(path: Path) -> list[tuple[int, str, bytes]]:
    """(id, topic, payload) of the events in an outbox file, oldest first (read-only)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        return [
            (int(i), str(t), bytes(p))
            for i, t, p in db.execute("SELECT id, topic, payload FROM event ORDER BY id")
        ]
    finally:
        db.close()


def outbox_rows(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=2.0)
    try:
        return int(db.execute("SELECT count(*) FROM event").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        db.close()


# -- a device that publishes -------------------------------------------------------------------


class StreamPublisher(threading.Thread):
    """Publishes `items` in order from its own thread at `rate_hz` (None: as fast as it can).

    At-least-once like a real device: QoS 1, at most `max_inflight` unacknowledged; when the
    connection drops it reconnects (a new client, clean session) and publishes again every item
    the broker had not acknowledged, then carries on. `acked` counts acknowledged items
    (each once), `republished` the items sent again after a reconnect.
    """

    def __init__(
        self,
        host: str,
        port: int,
        items: Sequence[tuple[str, bytes]],
        *,
        rate_hz: float | None = None,
        qos: int = 1,
        max_inflight: int = 200,
        give_up_s: float = 60.0,
    ) -> None:
        super().__init__(daemon=True, name="stream-publisher")
        self.host, self.port = host, port
        self.items = list(items)
        self.rate_hz = rate_hz
        self.qos = qos
        self.max_inflight = max_inflight
        self.give_up_s = give_up_s
        self.acked = 0
        self.handed = 0  # items handed to paho at least once
        self.republished = 0
        self.reconnects = 0
        self.error: BaseException | None = None
        self.first_ack_at: float | None = None
        self.last_ack_at: float | None = None
        self._stop_at: float | None = None
        self._client: paho.Client | None = None
        self._unacked: dict[int, int] = {}  # mid -> item index
        self._todo: deque[int] = deque()
        self._connected = False

    # called from the test thread
    def finish(self, timeout_s: float = 60.0) -> None:
        """Wait until every item is acknowledged (or the thread gave up); re-raises its error."""
        self.join(timeout_s)
        if self.is_alive():
            self._stop_at = time.monotonic()
            self.join(5)
            raise AssertionError(f"publisher not done in {timeout_s} s: {self.acked} acked")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop now (unsent items are never sent)."""
        self._stop_at = time.monotonic()
        self.join(10)

    @property
    def done(self) -> bool:
        return self.acked == len(self.items)

    # the thread
    def _new_client(self) -> bool:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"dev-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            index = self._unacked.pop(mid, None)
            if index is not None:
                self.acked += 1
                now = time.monotonic()
                self.first_ack_at = self.first_ack_at or now
                self.last_ack_at = now

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._connected = not reason.is_failure

        def on_disconnect(*_: Any) -> None:
            self._connected = False

        client.on_publish = on_publish
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(self.host, self.port, keepalive=5)
        except OSError:
            return False
        deadline = time.monotonic() + 3.0
        while not self._connected and time.monotonic() < deadline:
            if client.loop(0.02) != paho.MQTT_ERR_SUCCESS:
                break
        if not self._connected:
            with contextlib.suppress(Exception):
                client.disconnect()
            return False
        self._client = client
        return True

    def _reconnect(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client = None
        # What the broker had not acknowledged goes again, first, in order.
        again = sorted(self._unacked.values())
        self._unacked.clear()
        self.republished += len(again)
        self._todo.extendleft(reversed(again))
        while not self._new_client():
            if self._stop_at is not None:
                return
            time.sleep(0.1)
        self.reconnects += 1

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        started = time.monotonic()
        if not self._new_client():
            self._reconnect()
        nxt = 0
        while True:
            if self._stop_at is not None:
                break
            if self.done:
                break
            if time.monotonic() - started > self.give_up_s:
                raise AssertionError(f"publisher gave up after {self.give_up_s} s")
            client = self._client
            assert client is not None
            if not self._connected:
                self._reconnect()
                continue
            allowed = len(self.items)
            if self.rate_hz is not None:
                allowed = min(allowed, int((time.monotonic() - started) * self.rate_hz) + 1)
            while len(self._unacked) < self.max_inflight and (self._todo or nxt < allowed):
                index = self._todo.popleft() if self._todo else nxt
                if index == nxt:
                    nxt += 1
                topic, payload = self.items[index]
                info = client.publish(topic, payload, qos=self.qos)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    self._todo.appendleft(index)
                    self._connected = False
                    break
                self.handed = max(self.handed, nxt)
                if self.qos == 0:
                    self.acked += 1
                else:
                    self._unacked[info.mid] = index
            if client.loop(0.002) != paho.MQTT_ERR_SUCCESS:
                self._connected = False
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.loop(0.05)
                self._client.disconnect()


class LoginPublisher(Publisher):
    """The harness's Publisher (one thread, QoS 1 flow control) with a user name and password."""

    def __init__(self, host: str, port: int, username: str, password: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self._max_inflight = 200
        self._unacked: set[int] = set()
        self.client.on_publish = lambda _c, _u, mid, *_: self._unacked.discard(mid)
        self.client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + 5
        while not self.client.is_connected():
            assert time.monotonic() < deadline, f"{username} did not connect"
            self.client.loop(0.05)


# -- network namespaces --------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class NetNs:
    """A network namespace held by a `sleep` process; `inside()` moves the calling thread in.

    Threads and processes started from a thread inside the namespace are inside it too; the
    calling thread returns to its own namespace when `inside()` ends.
    """

    def __init__(self) -> None:
        unshare = require("unshare")
        self._holder = subprocess.Popen([unshare, "-n", "sleep", "600"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        own = os.readlink("/proc/self/ns/net")
        while os.readlink(f"/proc/{self._holder.pid}/ns/net") == own:
            if time.monotonic() > deadline or self._holder.poll() is not None:
                raise AssertionError("unshare -n did not create a network namespace")
            time.sleep(0.01)
        self.path = f"/proc/{self._holder.pid}/ns/net"

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test namespace failed")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home failed")
        finally:
            os.close(home)
            os.close(target)

    def loopback(self, up: bool) -> None:
        """`ip link set lo up|down` inside the namespace."""
        with self.inside():
            subprocess.run(
                [require("ip"), "link", "set", "lo", "up" if up else "down"], check=True, timeout=10
            )

    def close(self) -> None:
        self._holder.kill()
        self._holder.wait(5)


# -- misc ----------------------------------------------------------------------------------------


def mosquitto_passwd(path: Path, users: dict[str, str]) -> Path:
    for i, (user, password) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        args = [require("mosquitto_passwd"), "-b", *create, str(path), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=10)
    return path


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def slow_model(path: Path, layers: int, width: int = 512) -> Path:
    """The demo model made deliberately slow, with identical outputs: a chain of `layers` dense
    tanh layers of `width` fed from each window is multiplied by zero and added to the score
    (ReduceMean -> MatMul ... -> ReduceSum -> * 0 -> + score). It depends on the input, so
    onnxruntime cannot fold it away at load; tanh keeps it finite, so 0 * x is exactly 0."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(DEMO_MODEL))
    graph = proto.graph
    producer = next(node for node in graph.node if "score" in node.output)
    producer.output[list(producer.output).index("score")] = "score_fast"
    rng = np.random.default_rng(11)
    weights = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "slow_axes_12"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "slow_axis_1"),
            numpy_helper.from_array(np.ones((1, width), dtype=np.float32), "slow_spread"),
            numpy_helper.from_array(weights, "slow_weights"),
            numpy_helper.from_array(np.zeros((), dtype=np.float32), "slow_zero"),
        ]
    )
    nodes = [
        helper.make_node("ReduceMean", ["window", "slow_axes_12"], ["slow_mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["slow_mean", "slow_axis_1"], ["slow_col"]),
        helper.make_node("MatMul", ["slow_col", "slow_spread"], ["slow_h0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"slow_h{i}", "slow_weights"], [f"slow_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"slow_h{layers}", "slow_axis_1"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", ["score_fast", "slow_nothing"], ["score"]),
    ]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path
