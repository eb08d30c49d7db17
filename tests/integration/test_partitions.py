"""Partitions on a real nats-server: the broker's mapping, two daemons sharing the partitions.

nats-server (JetStream, MQTT listener, subject mapping) puts `sensors/<id>/data` on
`part/<k>/sensors/<id>/data`; each daemon holds one persistent session per partition it owns
(`[partitions] index/of`), so every stream is scored by exactly one daemon.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from daemon_harness import OteoProcess, wait_until
from fault_kit import T0, Fleet, demo_manifest, reading, rows
from nats_kit import MqttPublisher, NatsServer, mqtt_client

from daemon.partition import partition_of

COUNT = 4  # partitions
STREAMS = [f"pump-{i:02d}" for i in range(20)]
FAULTY = "pump-07"
WINDOW = demo_manifest().window  # 32 samples, hop 1


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", count=COUNT, ack_wait_s=3.0)
    server.start()
    yield server
    server.stop()


class Events:
    """Events published by the daemons, collected by an MQTT 3.1.1 subscriber."""

    def __init__(self, server: NatsServer) -> None:
        self.docs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt_client(server)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.subscribe("oteo/+/event", 1)
        assert subscribed.wait(5), "no SUBACK for the events"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.docs.append(json.loads(msg.payload))

    def starts(self, stream: str) -> list[str]:
        with self._lock:
            return [
                d["event_id"] for d in self.docs if d["stream"] == stream and d["kind"] == "start"
            ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_broker_puts_each_stream_on_the_partition_oteo_computes(nats: NatsServer) -> None:
    got: list[str] = []
    lock = threading.Lock()
    sub = mqtt_client(nats, "mapping-check", persistent=True)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(msg.topic)

    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.subscribe("part/+/sensors/+/data", 1)
    assert subscribed.wait(5)
    ids = [f"machine-{i}" for i in range(40)] + ["a", "foobar", "pump_1", "Ω-7"]
    ids += [f"line{j}-cell{j * 7}" for j in range(5)]
    pub = MqttPublisher(nats)
    for stream in ids:
        pub.send(f"sensors/{stream}/data", b"{}")
    pub.close()
    assert wait_until(lambda: len(got) >= len(ids), 10.0), f"only {len(got)} of {len(ids)} arrived"
    sub.disconnect()
    sub.loop_stop()
    where = {topic.split("/")[3]: int(topic.split("/")[1]) for topic in got}
    assert where == {stream: partition_of(stream, COUNT) for stream in ids}
    assert len(set(where.values())) == COUNT  # the ids cover every partition


# -- two daemons ------------------------------------------------------------------------------


def _daemon(fleet: Fleet, nats: NatsServer, index: int, **partitions: Any) -> OteoProcess:
    return fleet(
        nats.url,
        mqtt={"protocol": "3.1.1"},
        partitions={
            "count": COUNT,
            "index": index,
            "of": 2,
            "redelivery_wait_s": 3.0,  # the test server's ack_wait
            **partitions,
        },
    )


def _values(stream: str, start: int, n: int) -> np.ndarray:
    values = rows(n, seed=STREAMS.index(stream), start=start)
    if stream == FAULTY:  # a level shift of 40 scales on one channel, samples 60 .. 99
        scale = np.asarray(demo_manifest().channel_scale)
        fault = (np.arange(start, start + n) >= 60) & (np.arange(start, start + n) < 100)
        values[fault, 2] += 40 * scale[2]
    return values


def _send(pub: MqttPublisher, start: int, n: int) -> None:
    """Samples start .. start + n - 1 of every stream, row by row across streams, with seq."""
    values = {s: _values(s, start, n) for s in STREAMS}
    for i in range(n):
        for stream in STREAMS:
            seq = start + i
            pub.send(f"sensors/{stream}/data", reading(T0 + seq, values[stream][i], seq=seq))
    pub.flush()


def _per_stream(proc: OteoProcess, name: str) -> dict[str, float]:
    return {labels["stream"]: v for labels, v in proc.metrics().series(name) if v}


def _total(procs: list[OteoProcess], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for proc in procs:
        for stream, value in _per_stream(proc, name).items():
            out[stream] = out.get(stream, 0.0) + value
    return out


def _owner(stream: str) -> int:
    return partition_of(stream, COUNT) % 2


def test_two_daemons_score_every_stream_exactly_once(nats: NatsServer, fleet: Fleet) -> None:
    daemons = [_daemon(fleet, nats, 0), _daemon(fleet, nats, 1)]
    events = Events(nats)
    pub = MqttPublisher(nats)
    n = 160
    _send(pub, 0, n)
    done = wait_until(
        lambda: _total(daemons, "oteo_stream_readings_total") == dict.fromkeys(STREAMS, n), 30.0
    )
    assert done, _total(daemons, "oteo_stream_readings_total")
    for index, proc in enumerate(daemons):
        mine = _per_stream(proc, "oteo_stream_readings_total")
        assert set(mine) == {s for s in STREAMS if _owner(s) == index}
        m = proc.metrics()
        for k in range(COUNT):
            owned = m.get("oteo_partition_owned", -1.0, partition=str(k))
            assert owned == (1.0 if k % 2 == index else -1.0)  # only its own partitions
    windows = wait_until(
        lambda: (
            _total(daemons, "oteo_stream_windows_total") == dict.fromkeys(STREAMS, n - WINDOW + 1)
        ),
        10.0,
    )
    assert windows, _total(daemons, "oteo_stream_windows_total")
    assert wait_until(lambda: events.starts(FAULTY), 10.0), "the fault raised no alarm"
    assert len(events.starts(FAULTY)) == 1
    assert all(not events.starts(s) for s in STREAMS if s != FAULTY)
    events.close()
    pub.close()
