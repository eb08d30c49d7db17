"""Partitions on a real nats-server: the broker's mapping, two daemons sharing the partitions.

nats-server (JetStream, MQTT listener, subject mapping) puts `sensors/<id>/data` on
`part/<k>/sensors/<id>/data`; each daemon holds one persistent session per partition it owns
(`[partitions] index/of`), so every stream is scored by exactly one daemon.
"""

from __future__ import annotations

import json
import threading
import time
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
            "checkpoint_s": 1.0,  # below it: acks held longer would come back
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


def test_two_daemons_score_every_stream_exactly_once(
    nats: NatsServer, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _daemon(fleet, nats, 0)
    # The second one's config says index 0 too: $OTEO_PARTITION_INDEX (as a systemd template
    # unit or a StatefulSet ordinal would set it) makes it index 1.
    monkeypatch.setenv("OTEO_PARTITION_INDEX", "1")
    second = _daemon(fleet, nats, 0)
    monkeypatch.delenv("OTEO_PARTITION_INDEX")
    daemons = [first, second]
    events = Events(nats)
    pub = MqttPublisher(nats)
    n = 160
    _send(pub, 0, n)
    done = wait_until(
        lambda: _total(daemons, "oteo_stream_readings_total") == dict.fromkeys(STREAMS, n), 30.0
    )
    assert done, _total(daemons, "oteo_stream_readings_total")
    for index, proc in enumerate(daemons):
        sessions = json.loads(proc.get("/readyz")[1])["detail"]["partitions"]
        assert sessions == {str(k): True for k in range(COUNT) if k % 2 == index}
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


def _checkpoint_files(proc: OteoProcess) -> list[Path]:
    """The daemon's partition checkpoints, `<k>.json` (not the `<k>.baselines.json` beside)."""
    paths = sorted((proc.state_dir / "partitions").glob("*.json"))
    return [p for p in paths if p.stem.isdigit()]


def _checkpoints(proc: OteoProcess) -> dict[str, dict[str, Any]]:
    """Every stream's checkpointed state, from all of the daemon's partition files."""
    out: dict[str, dict[str, Any]] = {}
    for path in _checkpoint_files(proc):
        out.update(json.loads(path.read_text())["streams"])
    return out


def _clean(proc: OteoProcess) -> list[bool]:
    return [json.loads(p.read_text())["clean"] for p in _checkpoint_files(proc)]


def test_a_restarted_daemon_resumes_its_partitions_windows(nats: NatsServer, fleet: Fleet) -> None:
    a, b = _daemon(fleet, nats, 0), _daemon(fleet, nats, 1)
    pub = MqttPublisher(nats)
    _send(pub, 0, 100)
    assert wait_until(
        lambda: _total([a, b], "oteo_stream_readings_total") == dict.fromkeys(STREAMS, 100), 30.0
    )
    assert a.stop() == 0
    assert _clean(a) == [True, True]
    assert "another instance owns" not in a.log_text()  # a clean stop loses no session
    mine = sorted(s for s in STREAMS if _owner(s) == 0)
    assert sorted(_checkpoints(a)) == mine
    baselines: dict[str, Any] = {}
    for path in (a.state_dir / "partitions").glob("*.baselines.json"):
        baselines.update(json.loads(path.read_text())["streams"])
    assert sorted(baselines) == mine
    assert all(doc["baseline"] is not None for doc in baselines.values())
    _send(pub, 100, 40)  # while a is down: its sessions keep them
    a.start()
    assert wait_until(
        lambda: _per_stream(a, "oteo_stream_readings_total") == dict.fromkeys(mine, 40), 20.0
    ), _per_stream(a, "oteo_stream_readings_total")
    # Every reading after the restart made a window: no warm-up (cold, 31 readings would not).
    assert wait_until(
        lambda: _per_stream(a, "oteo_stream_windows_total") == dict.fromkeys(mine, 40), 10.0
    )
    m = a.metrics()
    assert m("oteo_seq_gaps_total") == 0
    assert m("oteo_gap_resets_total") == 0
    pub.close()


@pytest.fixture
def nats_6s(tmp_path: Path) -> Iterator[NatsServer]:
    """As `nats`, with an ack_wait of 6 s."""
    server = NatsServer(tmp_path / "nats6", count=COUNT, ack_wait_s=6.0)
    server.start()
    yield server
    server.stop()


def test_a_killed_daemon_loses_no_reading(nats_6s: NatsServer, fleet: Fleet) -> None:
    # Checkpoints every 64 readings of a partition, or 5.5 s (below the broker's ack_wait of
    # 6 s here): the kill comes well within those 5.5 s, so it finds readings not checkpointed.
    nats = nats_6s
    # redelivery_wait_s without the margin the docs ask for: every delivery to the dead run is
    # 1.3 s old at the kill, so none comes back after newer readings (checked below).
    timing = {"checkpoint_readings": 64, "checkpoint_s": 5.5, "redelivery_wait_s": 6.0}
    a = _daemon(fleet, nats, 0, **timing)
    b = _daemon(fleet, nats, 1, **timing)
    pub = MqttPublisher(nats)
    _send(pub, 0, 100)
    assert wait_until(
        lambda: _total([a, b], "oteo_stream_readings_total") == dict.fromkeys(STREAMS, 100), 30.0
    )
    time.sleep(1.3)  # a heartbeat notes how far each stream got since the checkpoint
    a.kill()  # SIGKILL: readings since its last checkpoint were never acknowledged
    mine = sorted(s for s in STREAMS if _owner(s) == 0)
    at_kill = _checkpoints(a)
    assert sorted(at_kill) == mine
    # The test means something only if some readings were taken but not yet checkpointed.
    assert any(d["window"]["last_seq"] < 99 for d in at_kill.values()), at_kill
    _send(pub, 100, 40)
    a.start(wait="/healthz")
    assert wait_until(lambda: "redelivery after an unclean stop" in a.log_text(), 5.0)
    assert wait_until(lambda: a.get("/readyz")[0] == 200, 20.0), a.log_text()[-3000:]

    def resumed() -> bool:
        windows = _per_stream(a, "oteo_stream_windows_total")
        readings = _per_stream(a, "oteo_stream_readings_total")
        # Each stream ends at seq 139: what the checkpoint held, plus every reading after it.
        return (
            all(readings.get(s, 0) == 139 - at_kill[s]["window"]["last_seq"] for s in mine)
            and windows == readings
        )

    assert wait_until(resumed, 20.0), (
        _per_stream(a, "oteo_stream_readings_total"),
        {s: at_kill[s]["window"]["last_seq"] for s in mine},
    )
    m = a.metrics()
    assert m("oteo_seq_gaps_total") == 0  # nothing lost, counted by seq
    assert m("oteo_redelivered_late_total") == 0
    assert m("oteo_gap_resets_total") == 0
    # Taken by the dead run after its checkpoint, redelivered, scored again: counted.
    assert m("oteo_rescored_readings_total") == sum(
        99 - at_kill[s]["window"]["last_seq"] for s in mine
    )
    assert a.stop() == 0
    assert {s: d["window"]["last_seq"] for s, d in _checkpoints(a).items()} == dict.fromkeys(
        mine, 139
    )
    print("duplicates dropped after the kill:", m("oteo_redelivered_duplicates_total"))
    pub.close()


def test_two_owners_of_one_partition_are_reported(nats: NatsServer, fleet: Fleet) -> None:
    """nats-server gives a client id to the last connect: two daemons configured to own the
    same partition take its session from each other, and say so."""
    common = {"mqtt": {"protocol": "3.1.1"}, "wait": "/healthz"}
    a = fleet(nats.url, partitions={"count": COUNT, "owned": [0]}, **common)
    b = fleet(nats.url, partitions={"count": COUNT, "owned": [0, 1]}, **common)
    needle = "another instance owns partition 0 too"
    assert wait_until(lambda: needle in a.log_text() + b.log_text(), 15.0)
    lost = sum(p.metrics().get("oteo_partition_sessions_lost_total", partition="0") for p in (a, b))
    assert lost >= 1


def test_ops_answer_on_reply_to_over_nats(nats: NatsServer, fleet: Fleet) -> None:
    """The instance's own link (MQTT 3.1.1 on nats-server) still serves operations."""
    daemon = fleet(
        nats.url, mqtt={"protocol": "3.1.1"}, partitions={"count": COUNT, "index": 0, "of": 1}
    )
    replies: list[dict[str, Any]] = []
    sub = mqtt_client(nats)
    sub.on_message = lambda _c, _u, msg: replies.append(json.loads(msg.payload))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.subscribe("replies/#", 1)
    assert subscribed.wait(5)
    windows = [rows(WINDOW, seed=3).tolist()]
    request = {"windows": windows, "id": "req-1", "reply_to": "replies/score"}
    pub = MqttPublisher(nats)
    pub.send(f"oteo/ops/{daemon.instance}/score", json.dumps(request).encode())
    pub.close()
    assert wait_until(lambda: replies, 10.0), "no reply on reply_to"
    assert replies[0]["op"] == "score" and replies[0]["id"] == "req-1"
    assert len(replies[0]["score"]) == 1
    sub.disconnect()
    sub.loop_stop()


def test_partitions_moving_to_another_instance_on_the_box_resume_their_windows(
    nats: NatsServer, fleet: Fleet, tmp_path: Path
) -> None:
    """N goes from 2 instances to 1 (same partition count): the one left takes every partition
    and, with a checkpoint_dir shared on the box, resumes the others' windows too."""
    shared = {"checkpoint_dir": str(tmp_path / "checkpoints")}
    a, b = _daemon(fleet, nats, 0, **shared), _daemon(fleet, nats, 1, **shared)
    pub = MqttPublisher(nats)
    _send(pub, 0, 100)
    assert wait_until(
        lambda: _total([a, b], "oteo_stream_readings_total") == dict.fromkeys(STREAMS, 100), 30.0
    )
    assert a.stop() == 0 and b.stop() == 0
    _send(pub, 100, 40)
    alone = fleet(
        nats.url,
        mqtt={"protocol": "3.1.1"},
        partitions={"count": COUNT, "index": 0, "of": 1, "checkpoint_s": 1.0,
                    "redelivery_wait_s": 3.0, **shared},
    )  # fmt: skip
    expected = dict.fromkeys(STREAMS, 40)
    assert wait_until(lambda: _per_stream(alone, "oteo_stream_windows_total") == expected, 20.0), (
        _per_stream(alone, "oteo_stream_windows_total")
    )  # every reading a window: no warm-up
    assert _per_stream(alone, "oteo_stream_readings_total") == expected
    assert alone.metrics()("oteo_seq_gaps_total") == 0
    pub.close()
