"""`oteo replay` against a real Mosquitto and the real daemon: a CSV's rows arrive as readings.

The payload is the documented reading (checked with the daemon's own parser), at QoS 1; the
daemon scores what arrives; `--now` and `--loop` keep time moving forward.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import Broker
from daemon_harness import OteoProcess, daemon_config, oteo_command, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.config import MqttSection
from daemon.model import Model
from daemon.reading import ReadingParser
from daemon.replay import ReplayPlan, replay
from daemon.series import read_series

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"
T0 = 1767225600  # 2026-01-01T00:00:00Z


class Subscriber:
    """Every message on `topic` with its QoS, from paho's own network thread."""

    def __init__(self, broker: Broker, topic: str, on_count: tuple[int, threading.Event] | None):
        self.received: list[tuple[str, int, Any]] = []
        self._on_count = on_count
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self.received.append((msg.topic, msg.qos, json.loads(msg.payload)))
        if self._on_count is not None and len(self.received) >= self._on_count[0]:
            self._on_count[1].set()

    def docs(self) -> list[Any]:
        return [doc for _, _, doc in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_rows_arrive_as_documented_readings_at_qos_1(tmp_path: Path, mosquitto: Broker) -> None:
    path = tmp_path / "pump.csv"
    path.write_text(
        "timestamp,current_a,pressure_bar,anomaly,changepoint\n"
        + "".join(f"2026-01-01T00:00:{i:02d}Z,{24 + i / 10},{4 + i / 100},0,0\n" for i in range(5)),
        encoding="utf-8",
    )
    sub = Subscriber(mosquitto, "sensors/#", None)
    try:
        plan = ReplayPlan(MqttSection(url=mosquitto.url), "pump-1", rate_hz=500)
        count = replay(read_series(path), plan)
        assert wait_until(lambda: len(sub.received) == 5, 5), sub.received
    finally:
        sub.close()
    assert (count.published, count.acknowledged, count.passes) == (5, 5, 1)
    assert {(topic, qos) for topic, qos, _ in sub.received} == {("sensors/pump-1/data", 1)}
    assert sub.docs() == [
        {"ts": T0 + i, "seq": i, "values": {"current_a": 24 + i / 10, "pressure_bar": 4 + i / 100}}
        for i in range(5)
    ]
    parser = ReadingParser(["current_a", "pressure_bar"], max_payload_bytes=65536, max_batch=10)
    for doc in sub.docs():  # the daemon's own intake takes them as they are
        (parsed,) = parser.parse(json.dumps(doc).encode())
        assert parsed.ts == doc["ts"] and parsed.seq == doc["seq"]


def test_a_loop_shifts_each_pass_by_the_span_of_the_csv(tmp_path: Path, mosquitto: Broker) -> None:
    path = tmp_path / "short.csv"
    path.write_text("time,a\n" + "".join(f"{T0 + 2 * i},{i}\n" for i in range(3)), "utf-8")
    stop = threading.Event()
    sub = Subscriber(mosquitto, "sensors/short/data", (7, stop))
    try:
        plan = ReplayPlan(MqttSection(url=mosquitto.url), "short", rate_hz=200, loop=True)
        count = replay(read_series(path), plan, stop)
    finally:
        sub.close()
    assert count.published >= 7 and count.passes >= 2
    docs = sub.docs()[:7]
    assert [d["ts"] for d in docs] == [T0 + 2 * i for i in range(7)]  # a 6 s pass, then on
    assert [d["seq"] for d in docs] == list(range(7))
    assert [d["values"]["a"] for d in docs] == [0, 1, 2, 0, 1, 2, 0]


def test_replay_now_loop_runs_until_ctrl_c(tmp_path: Path, mosquitto: Broker) -> None:
    path = tmp_path / "old.csv"
    path.write_text("timestamp,a\n2020-03-09 10:14:33,1\n2020-03-09 10:14:35,2\n", "utf-8")
    sub = Subscriber(mosquitto, "sensors/live/data", None)
    started = time.time()
    args = ["--stream", "live", "--now", "--loop", "--rate", "100"]
    proc = subprocess.Popen(
        oteo_command("replay", str(path), "--broker", mosquitto.url, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: len(sub.received) >= 10, 20), proc.poll()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0, err
    assert err == ""
    assert "old.csv: 2 readings of a to sensors/live/data, 100/s (loop)" in out
    docs = sub.docs()
    published = int(out.rsplit("published ", 1)[1].split()[0])
    assert published >= len(docs) >= 10
    assert abs(docs[0]["ts"] - started) < 5, "--now: timestamps from this host's clock"
    steps = [d["ts"] - docs[0]["ts"] for d in docs[:10]]
    assert steps == pytest.approx([2.0 * i for i in range(10)], abs=1e-5)  # the CSV's period


def test_the_daemon_scores_a_replayed_csv(tmp_path: Path, mosquitto: Broker) -> None:
    from training.simulator import simulate_runs, write_csv

    rows = 60
    window = Model.load(DEMO_MODEL).manifest.window
    path = tmp_path / "pump-7.csv"
    write_csv(path, simulate_runs(rows, 4, 1, []))
    daemon = OteoProcess(tmp_path, daemon_config(tmp_path, mosquitto.url, DEMO_MODEL))
    daemon.start()
    try:
        done = subprocess.run(
            oteo_command("replay", str(path), "--broker", mosquitto.url, "--rate", "1000"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"published {rows} readings ({rows} acknowledged, 1 full pass)" in done.stdout
        m = daemon.wait_metric(
            lambda m: m.get("oteo_windows_scored_total") == rows - window + 1,
            what="every window of the replayed readings scored",
        )
        assert m("oteo_readings_total") == rows
        assert m("oteo_messages_total", result="ok") == rows
        status, body = daemon.get("/v1/streams")
        assert status == 200 and "pump-7" in body.decode()
    finally:
        assert daemon.stop() == 0
