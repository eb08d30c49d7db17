"""The real daemon end to end: `oteo run` as a subprocess, a real Mosquitto, the demo model.

Readings go in over MQTT; events, states, status and op replies are read back over MQTT; metrics
and health over HTTP. Data time is not wall time: readings advance by the model's sample period
each, however fast they are published.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import (
    Metrics,
    OteoProcess,
    Publisher,
    Received,
    Watcher,
    daemon_config,
    reading,
    run_oteo,
    toml_text,
    v5_request_properties,
    wait_until,
)

from daemon.manifest import Manifest
from daemon.messages import Event, ModelRef, format_ts
from daemon.model import Model
from daemon.outbox import Outbox
from daemon.request import bits_to_hex

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"
# A level shift of 3-4 robust stds on the pressure sensor: the demo model flags it as one alarm
# with this channel on top, on every run of the build tried (a temperature shift may flap).
FAULT_CHANNEL = 4  # pressure_bar
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: data time of the first reading
Broker = Any  # conftest.Broker: .host .port .url .start() .stop() .restart()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> Path:
    assert DEMO_MODEL.exists(), f"{DEMO_MODEL} is missing: the demo model is committed with oteo"
    return DEMO_MODEL


@pytest.fixture(scope="module")
def demo(demo_model: Path) -> Manifest:
    return Model.load(demo_model).manifest


@pytest.fixture
def oteo(tmp_path: Path, mosquitto: Broker, demo_model: Path) -> Iterator[Callable[..., Any]]:
    """oteo(start=True, model=None, **config_sections) -> a daemon on the test's broker."""
    made: list[OteoProcess] = []

    def make(*, start: bool = True, model: Path | None = None, **sections: Any) -> OteoProcess:
        directory = tmp_path / f"oteo{len(made)}"
        directory.mkdir()
        config = daemon_config(directory, mosquitto.url, model or demo_model, **sections)
        proc = OteoProcess(directory, config)
        made.append(proc)
        if start:
            proc.start()
        return proc

    yield make
    for proc in made:
        proc.kill()


@pytest.fixture
def watch(mosquitto: Broker) -> Iterator[Callable[..., Watcher]]:
    """watch(topics=(("oteo/#", 1),), **kw) -> a subscribed Watcher (events arrive at QoS 1)."""
    made: list[Watcher] = []

    def make(topics: tuple[tuple[str, int], ...] = (("oteo/#", 1),), **kw: Any) -> Watcher:
        watcher = Watcher(mosquitto.host, mosquitto.port, topics, **kw)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.close()


@pytest.fixture
def publisher(mosquitto: Broker) -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make() -> Publisher:
        pub = Publisher(mosquitto.host, mosquitto.port)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.close(flush=False)


# -- helpers ---------------------------------------------------------------------------------


def normal_series(rows: int, seed: int) -> np.ndarray:
    """One run [rows, 8] of the simulated pump build the demo model was trained on."""
    from training.publisher import PublishPlan, stream_series

    plan = PublishPlan(url="mqtt://unused", streams=1, rate_hz=1.0, duration_s=rows, seed=seed)
    values, anomaly = stream_series(plan, 0)
    assert not anomaly.any()
    return values


@functools.cache
def build_scales() -> tuple[np.ndarray, np.ndarray]:
    """(level, noise) scale per channel over hours of the simulated pump build."""
    from training.simulator import reference_scales

    return reference_scales()


def level_scales() -> np.ndarray:
    return build_scales()[0]


def shifted(values: np.ndarray, channel: int, start: int, length: int, seed: int) -> np.ndarray:
    """`values` with a level shift on one channel, sized from hours of the same pump build."""
    from training.fault import inject

    rng = np.random.default_rng(seed)
    out, mask = inject(
        values, "level_shift", start, length, rng, channels=[channel], scales=build_scales()
    )
    assert mask.sum() == length
    return out


def readings_for(
    stream: str, values: np.ndarray, *, t0: float = T0, first_seq: int = 0
) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/{stream}/data", reading(t0 + i, row, seq=first_seq + i))
        for i, row in enumerate(values)
    ]


def interleave(*streams: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Row by row across streams, as machines publishing side by side would."""
    return [item for row in zip(*streams, strict=True) for item in row]


def windows_for(readings: int, manifest: Manifest) -> int:
    """Windows scored from one stream's first `readings` readings (no gaps)."""
    hop = manifest.alarm.hop
    return 0 if readings < manifest.window else (readings - manifest.window) // hop + 1


def unix(text: str) -> float:
    """Unix seconds from an output's RFC 3339 timestamp."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def events(watcher: Watcher, stream: str) -> list[dict[str, Any]]:
    """Distinct events on a stream (a QoS 1 redelivery is not a second event)."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for doc in watcher.docs(f"oteo/{stream}/event"):
        seen.setdefault((doc["event_id"], doc["kind"], doc["ts"]), doc)
    return list(seen.values())


def states(watcher: Watcher, stream: str) -> list[str]:
    return [doc["state"] for doc in watcher.docs(f"oteo/{stream}/state")]


def collapse(values: list[str]) -> list[str]:
    """Consecutive repeats removed: ["a", "a", "b", "a"] -> ["a", "b", "a"]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def wait_online(watcher: Watcher, instance: str, timeout_s: float = 10.0) -> None:
    """The status `online` arrived: the daemon's SUBSCRIBE, sent before it, is in place."""
    topic = f"oteo/status/{instance}"
    watcher.wait_for(
        lambda msgs: any(m.topic == topic and m.json()["state"] == "online" for m in msgs),
        timeout_s,
        f"{topic} online",
    )


def retained(broker: Broker, topic: str) -> Received | None:
    """The retained message on `topic`, as a new subscriber gets it (None if there is none)."""
    watcher = Watcher(broker.host, broker.port, [(topic, 1)])
    try:
        wait_until(lambda: watcher.all(topic), 2.0)
        found = [m for m in watcher.all(topic) if m.retain]
        return found[-1] if found else None
    finally:
        watcher.close()


def outbox_rows(path: Path) -> int:
    """Events in a (possibly open) outbox file, read as another process would."""
    db = sqlite3.connect(path, timeout=2.0)
    try:
        return int(db.execute("SELECT count(*) FROM event").fetchone()[0])
    finally:
        db.close()


def assert_schema_1(messages: list[Received]) -> None:
    outputs = [m for m in messages if m.payload and "/ops/" not in m.topic]
    assert outputs, "no output messages"
    bad = [(m.topic, m.payload[:200]) for m in outputs if m.json().get("schema") != 1]
    assert not bad, f"outputs without schema 1: {bad[:5]}"


# -- tests -----------------------------------------------------------------------------------


def test_fault_on_one_stream_raises_one_start_and_one_end_event_on_that_stream_only(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    demo: Manifest,
    mosquitto: Broker,
) -> None:
    rows, fault_start, fault_rows, channel = 1500, 700, 400, FAULT_CHANNEL
    names = [f"pump-{i}" for i in range(4)]
    series = [normal_series(rows, seed=11 + i) for i in range(4)]
    series[2] = shifted(series[2], channel, fault_start, fault_rows, seed=5)
    watcher = watch()
    daemon = oteo()
    wait_online(watcher, daemon.instance)

    pub = publisher()
    sent = pub.send_all(
        interleave(*(readings_for(n, s) for n, s in zip(names, series, strict=True)))
    )
    assert sent == 4 * rows
    scored = 4 * windows_for(rows, demo)
    m = daemon.wait_metric(
        lambda m: m("oteo_windows_scored_total") >= scored, 60, f"{scored} windows scored"
    )
    assert m("oteo_readings_total") == 4 * rows
    assert m("oteo_windows_scored_total") == scored
    assert m("oteo_messages_total", result="ok") == 4 * rows
    watcher.wait_for(
        lambda _: any(e["kind"] == "end" for e in events(watcher, names[2])),
        10,
        f"an end event on {names[2]}",
    )
    ended_at = time.monotonic()

    def normal_again() -> bool:
        seen = collapse(states(watcher, names[2]))
        return "anomalous" in seen and "normal" in seen[seen.index("anomalous") :]

    wait_until(normal_again, 5)  # the state follows the end event (asserted below)
    # Observation period: anything else the last batch produced would have arrived by now.
    time.sleep(max(0.0, ended_at + 0.5 - time.monotonic()))

    faulty = events(watcher, names[2])
    starts = [e for e in faulty if e["kind"] == "start"]
    ends = [e for e in faulty if e["kind"] == "end"]
    summary = [(e["kind"], e["ts"], round(e["score"], 3)) for e in faulty]
    assert len(starts) == 1 and len(ends) == 1, summary
    event_id = starts[0]["event_id"]
    assert all(e["event_id"] == event_id for e in faulty), summary
    start, end = starts[0], ends[0]
    # The alarm lies within the fault (plus the windows that still hold shifted samples).
    fault_from, fault_to = T0 + fault_start, T0 + fault_start + fault_rows + demo.window
    assert fault_from <= unix(start["ts"]) < unix(end["ts"]) <= fault_to + 60, summary
    assert end["ended"] == end["ts"] and end["started"] == start["started"]
    top = [c["channel"] for c in start["top_channels"]]
    assert top[0] == demo.channels[channel], top
    # The end names the episode's cause (its peak window), with the episode's length and peak.
    assert end["top_channels"][0]["channel"] == demo.channels[channel], end["top_channels"]
    assert end["duration_s"] == unix(end["ended"]) - unix(end["started"]) > 0
    assert end["peak_score"] >= max(e["score"] for e in faulty)
    for e in faulty:
        assert 0.0 <= e["p_value"] <= 1.0
        assert e["stream"] == names[2] and e["instance"] == daemon.instance
        assert e["model"]["sha256"] == m.series("oteo_model_info")[0][0]["sha256"]
    assert start["score"] >= start["threshold"]
    for quiet in (names[0], names[1], names[3]):
        assert events(watcher, quiet) == [], f"events on normal stream {quiet}"
        assert "anomalous" not in states(watcher, quiet)

    seen = collapse(states(watcher, names[2]))
    assert "anomalous" in seen and "normal" in seen[seen.index("anomalous") :], seen
    last = retained(mosquitto, f"oteo/{names[2]}/state")
    assert last is not None and last.json()["state"] == "normal"
    assert_schema_1(watcher.all())
    assert daemon.stop() == 0


def test_malformed_payloads_are_counted_by_reason_and_never_reach_the_model(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    demo: Manifest,
) -> None:
    max_bytes, max_batch = 512, 4
    daemon = oteo(ingest={"max_payload_bytes": max_bytes, "max_batch_readings": max_batch})
    watcher = watch()
    good = [round(float(v), 3) for v in normal_series(1, seed=3)[0]]
    names = dict(zip(demo.channels, good, strict=True))
    row = json.dumps(good)

    def first(value: str) -> bytes:
        """A reading whose first value is the JSON text `value`."""
        rest = ", ".join(json.dumps(v) for v in good[1:])
        return f'{{"ts": 1, "values": [{value}, {rest}]}}'.encode()

    zeros = "[" + ",".join(["0"] * len(good)) + "]"
    bad: list[tuple[str, str, bytes]] = [  # (drop reason, stream, payload)
        ("non_finite", "nan", first("NaN")),
        ("non_finite", "inf", first("Infinity")),
        ("non_finite", "huge-int", first(f"1{'0' * 400}")),
        ("bad_type", "string-number", first('"1.5"')),
        ("bad_type", "boolean", first("true")),
        ("bad_type", "null-value", first("null")),
        ("bad_type", "negative-seq", f'{{"ts": 1, "seq": -1, "values": {row}}}'.encode()),
        ("too_large", "too-large", b" " * (max_bytes + 1) + reading(1, good)),
        ("not_json", "not-json", b'{"ts": 1, "values": ['),
        ("not_json", "not-utf8", b'{"ts": 1, "values": "\xff\xfe"}'),
        ("bad_schema", "no-values", b'{"ts": 1}'),
        ("bad_schema", "extra-key", f'{{"ts": 1, "values": {row}, "unit": "si"}}'.encode()),
        ("bad_schema", "bare-number", b"42"),
        ("bad_schema", "values-string", b'{"ts": 1, "values": "1,2,3"}'),
        ("bad_timestamp", "ts-words", f'{{"ts": "yesterday", "values": {row}}}'.encode()),
        ("bad_timestamp", "ts-millis", f'{{"ts": 1767225600000, "values": {row}}}'.encode()),
        (
            "bad_timestamp",
            "ts-no-offset",
            f'{{"ts": "2026-01-01T00:00:00", "values": {row}}}'.encode(),
        ),
        ("bad_timestamp", "ts-negative", f'{{"ts": -5, "values": {row}}}'.encode()),
        (
            "unknown_channel",
            "unknown-ch",
            json.dumps({"ts": 1, "values": {**names, "rpm2": 1.0}}).encode(),
        ),
        (
            "missing_channel",
            "missing-ch",
            json.dumps({"ts": 1, "values": dict(list(names.items())[1:])}).encode(),
        ),
        ("wrong_length", "short", f'{{"ts": 1, "values": {json.dumps(good[:-1])}}}'.encode()),
        ("wrong_length", "long", f'{{"ts": 1, "values": {json.dumps([*good, 1.0])}}}'.encode()),
        ("empty_batch", "empty-batch", b"[]"),
        (
            "batch_too_large",
            "big-batch",
            json.dumps(
                [{"ts": i + 1, "values": json.loads(zeros)} for i in range(max_batch + 1)]
            ).encode(),
        ),
        # One bad reading refuses its whole batch.
        (
            "non_finite",
            "mixed-batch",
            b"[" + reading(1, good) + b", " + first("NaN").replace(b'"ts": 1', b'"ts": 2') + b"]",
        ),
    ]
    per_channel: list[tuple[str, str, bytes]] = [  # (drop reason, topic, payload)
        ("not_json", f"sensors/ch-bad/ch/{demo.channels[0]}", b"abc"),
        ("bad_type", f"sensors/ch-bad/ch/{demo.channels[0]}", b"true"),
        ("non_finite", f"sensors/ch-bad/ch/{demo.channels[0]}", b"NaN"),
        ("bad_schema", f"sensors/ch-bad/ch/{demo.channels[0]}", b"[1.0]"),
        ("unknown_channel", "sensors/ch-bad/ch/no_such_channel", b"1.0"),
    ]
    topic_shapes = ["sensors//data", f"sensors/{'s' * 129}/data"]  # no stream id / too long
    for _, _, payload in bad:
        assert len(payload) <= max_bytes or payload.startswith(b" "), payload[:80]
    wait_online(watcher, daemon.instance)
    before = daemon.metrics()
    expected: dict[str, float] = {}
    for reason, *_ in bad + per_channel:
        expected[reason] = expected.get(reason, 0) + 1
    expected["unknown_stream_topic"] = len(topic_shapes)

    pub = publisher()
    pub.send_all([(f"sensors/{stream}/data", payload) for _, stream, payload in bad])
    pub.send_all([(topic, payload) for _, topic, payload in per_channel])
    pub.send_all([(topic, reading(T0, good)) for topic in topic_shapes])

    def counted(m: Metrics) -> bool:
        return all(
            m("oteo_messages_total", result=r) - before("oteo_messages_total", result=r) >= n
            for r, n in expected.items()
        )

    after = daemon.wait_metric(counted, 10, "every malformed payload counted")
    got = {
        r: after("oteo_messages_total", result=r) - before("oteo_messages_total", result=r)
        for r in expected
    }
    assert got == expected
    for name in ("oteo_readings_total", "oteo_windows_scored_total"):
        assert after(name) == before(name), name
    assert after("oteo_messages_total", result="ok") == before("oteo_messages_total", result="ok")
    status, body = daemon.get("/v1/streams")
    assert status == 200
    assert json.loads(body) == [], "a refused payload created a stream"
    assert daemon.get("/healthz")[0] == 200

    # Still serving: a valid stream is scored afterwards.
    rows = demo.window + 3 * demo.alarm.hop
    pub.send_all(readings_for("after-bad", normal_series(rows, seed=4)))
    windows = windows_for(rows, demo)
    final = daemon.wait_metric(
        lambda m: m("oteo_windows_scored_total") >= windows, 10, "the valid stream scored"
    )
    assert final("oteo_windows_scored_total") == windows
    assert final("oteo_readings_total") == rows
    assert [s["stream"] for s in json.loads(daemon.get("/v1/streams")[1])] == ["after-bad"]
    assert daemon.stop() == 0


def test_restart_with_backlog_loses_nothing(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
) -> None:
    n = 2000
    watcher = watch()
    daemon = oteo()
    wait_online(watcher, daemon.instance)
    assert daemon.stop() == 0

    pub = publisher()
    pub.send_all(readings_for("backlog", normal_series(n, seed=21)))
    daemon.start()
    m = daemon.wait_metric(lambda m: m("oteo_readings_total") >= n, 30, f"{n} readings")
    time.sleep(0.5)  # observation period: nothing more should come (an absence is not awaited)
    m = daemon.metrics()
    assert m("oteo_readings_total") == n
    assert m("oteo_messages_total", result="ok") == n
    assert m("oteo_seq_gaps_total") == 0
    assert m("oteo_messages_total", result="duplicate") == 0
    assert m("oteo_messages_total", result="late") == 0
    assert daemon.stop() == 0


def test_events_left_in_the_outbox_are_published_once_the_broker_is_back(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    # A persistent subscriber: it gets what the daemon publishes even if it reconnects later.
    watcher = watch(client_id=f"w-{uuid.uuid4().hex[:8]}", persistent=True)
    daemon = oteo(start=False)
    # What a daemon killed before the broker acknowledged its event leaves behind.
    left = Event(
        event_id=uuid.uuid4().hex,
        kind="start",
        stream="crashed",
        instance=daemon.instance,
        ts=format_ts(T0),
        started=format_ts(T0),
        score=2.0,
        peak_score=2.0,
        threshold=1.0,
        p_value=0.0001,
        top_channels=[],
        model=ModelRef(name=demo.name, version=demo.version, sha256="0" * 64),
    )
    outbox = Outbox(daemon.outbox_path, max_events=100, max_bytes=1 << 20)
    outbox.add("oteo/crashed/event", left.to_json(), qos=1)
    outbox.close()

    mosquitto.stop()
    daemon.start(wait="/healthz")

    def outage_counted() -> Metrics | None:
        """A scrape showing a failed attempt and the waiting event (the gauges and the link's
        counters reach /metrics about once a second)."""
        m = daemon.metrics()
        failures = m.series("oteo_mqtt_connect_failures_total")
        return m if any(v for _, v in failures) and m("oteo_outbox_events") == 1 else None

    wait_until(outage_counted, 10)  # what it shows is asserted below
    assert daemon.running, daemon.log_text()
    assert daemon.get("/readyz")[0] == 503
    assert daemon.get("/healthz")[0] == 200
    m = daemon.metrics()
    assert m("oteo_mqtt_connected") == 0
    assert outbox_rows(daemon.outbox_path) == 1

    mosquitto.start()
    got = watcher.wait_for(
        lambda msgs: [x for x in msgs if x.topic == "oteo/crashed/event"], 15, "the stored event"
    )
    assert got[0].json() == json.loads(left.to_json())
    assert wait_until(lambda: daemon.get("/readyz")[0] == 200, 10)
    assert wait_until(lambda: outbox_rows(daemon.outbox_path) == 0, 5)
    assert daemon.stop() == 0
    reopened = Outbox(daemon.outbox_path, max_events=100, max_bytes=1 << 20)
    assert len(reopened) == 0
    reopened.close()
    # The documented metrics of the outage (checked last: the behaviour above matters most).
    problems = []
    if m("oteo_outbox_events") != 1:
        problems.append(f"oteo_outbox_events {m('oteo_outbox_events')} with 1 event waiting")
    failures = {labels["reason"]: v for labels, v in m.series("oteo_mqtt_connect_failures_total")}
    if not failures.get("network"):
        problems.append(f"refused connections not counted as reason=network: {failures}")
    assert not problems, "; ".join(problems)


def test_alarm_end_produced_while_the_broker_is_down_is_published_after_it_returns(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    """A stream in alarm falls silent when the broker dies: its alarm ends (stale) offline."""
    watcher = watch(client_id=f"w-{uuid.uuid4().hex[:8]}", persistent=True)
    daemon = oteo(ingest={"stale_after_s": 2.0})
    wait_online(watcher, daemon.instance)
    rows = demo.window + 60
    values = normal_series(rows, seed=31)
    # Unmistakable, and it lasts to the last reading: only silence can end this alarm.
    values[demo.window :, FAULT_CHANNEL] += 10 * level_scales()[FAULT_CHANNEL]
    pub = publisher()
    pub.send_all(readings_for("dying", values))
    start = watcher.wait_for(
        lambda _: [e for e in events(watcher, "dying") if e["kind"] == "start"],
        15,
        "a start event",
    )[0]
    pub.close()
    mosquitto.stop()
    # The stream is silent for longer than stale_after_s: the daemon ends its alarm, offline.
    assert wait_until(lambda: outbox_rows(daemon.outbox_path) == 1, 10), daemon.log_text()[-3000:]
    assert daemon.running
    mosquitto.start()
    ends = watcher.wait_for(
        lambda _: [e for e in events(watcher, "dying") if e["kind"] == "end"], 15, "the end event"
    )
    assert len(ends) == 1 and ends[0]["event_id"] == start["event_id"]
    assert wait_until(lambda: outbox_rows(daemon.outbox_path) == 0, 5)
    # Retained state after the reconnect: stale.
    assert wait_until(
        lambda: (r := retained(mosquitto, "oteo/dying/state")) and r.json()["state"] == "stale", 5
    )
    assert daemon.stop() == 0


def test_ops_round_trip_over_mqtt_v5_and_http_with_error_replies(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    daemon = oteo()
    watcher = watch((("oteo/#", 1), ("replies/#", 1)))
    wait_online(watcher, daemon.instance)
    ops = f"oteo/ops/{daemon.instance}"
    data = normal_series(demo.window + 1, seed=41)
    windows = [data[:-1].round(4).tolist(), data[1:].round(4).tolist()]
    request = json.dumps({"windows": windows, "id": "req-1"})
    pub = publisher()

    def ask(op: str, body: str, reply_topic: str | None, correlation: bytes | None) -> None:
        props = v5_request_properties(reply_topic, correlation)
        pub.send(f"{ops}/{op}", body, properties=props)
        pub.flush()

    def reply_on(topic: str) -> Received:
        return watcher.wait_for(lambda msgs: [m for m in msgs if m.topic == topic], 10, topic)[0]

    ask("score", request, "replies/score", b"\x00corr-1")
    reply = reply_on("replies/score")
    assert bytes(reply.properties.CorrelationData) == b"\x00corr-1"
    doc = reply.json()
    assert doc["op"] == "score" and doc["id"] == "req-1" and doc["schema"] == 1
    assert len(doc["score"]) == 2 and len(doc["channel_score"]) == 2
    assert all(0 <= p <= 1 for p in doc["p_value"])
    expected = Model.load(daemon.config["model"]["path"]).run(np.asarray(windows, np.float32))
    np.testing.assert_allclose(doc["score"], expected.score, rtol=1e-5)

    ask("score", json.dumps({"windows": [], "id": "req-2"}), "replies/bad", b"corr-2")
    error = reply_on("replies/bad")
    assert bytes(error.properties.CorrelationData) == b"corr-2"
    assert error.json()["error"] == "bad_request" and error.json()["id"] == "req-2"

    # The demo model is not trained for hashing: its bits are code > the code's median.
    ask("hash", request, "replies/hash", b"corr-3")
    hashed = reply_on("replies/hash")
    assert bytes(hashed.properties.CorrelationData) == b"corr-3"
    code = Model.load(daemon.config["model"]["path"]).run(np.asarray(windows, np.float32)).code
    cut = np.asarray(demo.code_median)
    assert hashed.json()["bits"] == [bits_to_hex(row > cut) for row in code]

    ask("frobnicate", request, "replies/unknown", b"corr-4")
    assert reply_on("replies/unknown").json()["error"] == "unknown_op"

    before = daemon.metrics()
    ask("score", request, None, None)  # no response topic (and no reply_to): nowhere to answer
    m = daemon.wait_metric(
        lambda m: m.get("oteo_ops_total", op="score", result="no_reply_topic") == 1,
        10,
        "the unanswerable request counted",
    )
    assert (
        m("oteo_ops_total", op="score", result="ok")
        == before("oteo_ops_total", op="score", result="ok") + 1
    )
    time.sleep(0.3)  # observation period: no reply to it may arrive (an absence is not awaited)
    replies = [x.topic for x in watcher.all() if x.topic.startswith("replies/")]
    assert sorted(replies) == ["replies/bad", "replies/hash", "replies/score", "replies/unknown"]

    # HTTP: the same ops, and the errors as status codes.
    status, doc = daemon.post_json("/v1/ops/denoise", {"windows": windows, "id": "h-1"})
    assert status == 200 and doc["op"] == "denoise" and doc["id"] == "h-1"
    assert np.asarray(doc["reconstruction"]).shape == (2, demo.window, len(demo.channels))
    status, doc = daemon.post_json("/v1/ops/denoise", {"windows": [[[1.0, 2.0]]]})
    assert status == 400 and doc["error"] == "bad_request" and doc["op"] == "denoise"
    status, doc = daemon.post_json("/v1/ops/hash", {"windows": windows})
    assert status == 200 and doc["nbits"] == demo.code_size, doc

    # Mute over HTTP: only a stream the daemon tracks (creating one would track a stream that
    # nobody publishes, and at the stream cap evict a real one).
    status, doc = daemon.post_json("/v1/ops/mute", {"stream": "muted-1", "duration_s": 300})
    assert status == 404 and doc["error"] == "not_found", doc
    rows = demo.window + 40
    values = normal_series(rows, seed=43)
    values[demo.window :, FAULT_CHANNEL] += 10 * level_scales()[FAULT_CHANNEL]
    first, rest = readings_for("muted-1", values)[:5], readings_for("muted-1", values)[5:]
    pub.send_all(first)
    daemon.wait_metric(lambda m: m("oteo_readings_total") >= 5, 10, "muted-1's first readings")
    # The retained state then says muted, and no event while it lasts.
    status, doc = daemon.post_json("/v1/ops/mute", {"stream": "muted-1", "duration_s": 300})
    assert status == 200 and doc["ok"] and doc["state"] == "muted", doc
    assert wait_until(
        lambda: (r := retained(mosquitto, "oteo/muted-1/state")) and r.json()["state"] == "muted",
        5,
    )
    pub.send_all(rest + readings_for("loud-1", values))
    watcher.wait_for(
        lambda _: [e for e in events(watcher, "loud-1") if e["kind"] == "start"],
        10,
        "the unmuted twin's start event",
    )
    daemon.wait_metric(
        lambda m: m("oteo_readings_total") >= 2 * rows, 10, "both streams' readings taken"
    )
    time.sleep(0.3)  # observation period: no event on the muted stream may arrive
    assert events(watcher, "muted-1") == []
    assert collapse(states(watcher, "muted-1"))[-1] == "muted"
    streams = {s["stream"]: s for s in json.loads(daemon.get("/v1/streams")[1])}
    assert streams["muted-1"]["state"] == "muted" and streams["loud-1"]["state"] == "anomalous"
    status, doc = daemon.post_json("/v1/ops/mute", {"stream": "muted-1", "duration_s": -1})
    assert status == 400 and doc["error"] == "bad_request"
    assert daemon.stop() == 0
    # The replies were published, so the documented per-kind counter should show them.
    assert m("oteo_mqtt_published_total", kind="reply") >= 4, "replies not counted by kind"


def test_metrics_parse_and_pass_promtool(
    oteo: Callable[..., OteoProcess],
    publisher: Callable[..., Publisher],
    demo: Manifest,
) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert os.access(promtool, os.X_OK), "promtool not found: install Debian's prometheus"
    daemon = oteo()
    # Some traffic first, so that histograms and labelled series have samples.
    rows = demo.window + 10
    publisher().send_all(readings_for("scraped", normal_series(rows, seed=51)))
    windows = [normal_series(demo.window, seed=52).round(4).tolist()]
    assert daemon.post_json("/v1/ops/score", {"windows": windows})[0] == 200
    assert daemon.post_json("/v1/ops/score", {"windows": []})[0] == 400
    windows_scored = windows_for(rows, demo)
    # Gauges are refreshed about once a second: under load the windows can be scored before
    # the first refresh after the connect.
    m = daemon.wait_metric(
        lambda m: (
            m("oteo_windows_scored_total") >= windows_scored and m("oteo_mqtt_connected") == 1
        ),
        10,
        "windows scored, connected",
    )

    status, body = daemon.get("/metrics")
    assert status == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # The families the dashboards and alert rules use, with their types.
    for name, kind in {
        "oteo_messages": "counter",
        "oteo_readings": "counter",
        "oteo_windows_scored": "counter",
        "oteo_events": "counter",
        "oteo_inference_duration_seconds": "histogram",
        "oteo_batch_size_windows": "histogram",
        "oteo_mqtt_connected": "gauge",
        "oteo_model_info": "gauge",
        "oteo_streams": "gauge",
        "oteo_outbox_events": "gauge",
        "oteo_ops_duration_seconds": "histogram",
    }.items():
        assert m.types.get(name) == kind, (name, m.types.get(name))
    assert m("oteo_mqtt_connected") == 1
    assert m("oteo_readings_total") == rows
    assert m("oteo_inference_duration_seconds_count") >= 1
    info = m.series("oteo_model_info")
    assert len(info) == 1 and info[0][1] == 1
    assert info[0][0]["sha256"] == Model.load(daemon.config["model"]["path"]).sha256
    assert m("oteo_ops_total", op="score", result="ok") == 1
    assert m("oteo_ops_total", op="score", result="bad_request") == 1
    assert daemon.stop() == 0


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_hot_reload_swaps_model_and_failed_reload_keeps_old(
    oteo: Callable[..., OteoProcess],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo_model: Path,
    tiny_model_path: Path,
    tmp_path: Path,
) -> None:
    served = tmp_path / "served.onnx"
    shutil.copyfile(demo_model, served)
    sha_a = Model.load(served).sha256
    b = Model.load(tiny_model_path)
    assert b.sha256 != sha_a
    daemon = oteo(model=served)

    def model_sha(m: Metrics) -> list[str]:
        return [labels["sha256"] for labels, value in m.series("oteo_model_info") if value == 1]

    m = daemon.metrics()
    assert model_sha(m) == [sha_a]

    daemon.send_signal(signal.SIGHUP)
    m = daemon.wait_metric(
        lambda m: m("oteo_model_reloads_total", result="ok") == 1, 10, "the SIGHUP reload"
    )
    assert model_sha(m) == [sha_a]

    atomic_write(served, tiny_model_path.read_bytes())
    m = daemon.wait_metric(
        lambda m: m("oteo_model_reloads_total", result="ok") == 2, 10, "the file-change reload"
    )
    assert model_sha(m) == [b.sha256]
    assert json.loads(daemon.get("/readyz")[1])["detail"]["model"]["sha256"] == b.sha256

    atomic_write(served, b"this is not an onnx model\n" * 10)
    m = daemon.wait_metric(
        lambda m: m("oteo_model_reloads_total", result="failed") == 1, 10, "the failed reload"
    )
    assert m("oteo_model_reloads_total", result="ok") == 2
    assert model_sha(m) == [b.sha256]
    assert "failed, the current model keeps serving" in daemon.log_text()

    # Still scoring, with the model that kept serving (its own window length).
    rows = b.window + 4 * b.manifest.alarm.hop
    publisher().send_all(readings_for("after-reload", normal_series(rows, seed=61)))
    windows = windows_for(rows, b.manifest)
    m = daemon.wait_metric(
        lambda m: m("oteo_windows_scored_total") >= windows, 10, "scoring after reloads"
    )
    assert m("oteo_windows_scored_total") == windows
    status, doc = daemon.post_json(
        "/v1/ops/score", {"windows": [normal_series(b.window, seed=62).tolist()]}
    )
    assert status == 200 and len(doc["score"]) == 1
    assert daemon.stop() == 0
    # The retained status names the model it serves (checked last: a report, not the swap).
    status_msg = retained(mosquitto, f"oteo/status/{daemon.instance}")
    assert status_msg is not None
    assert status_msg.json()["model"]["sha256"] == b.sha256, "status still names the old model"


def test_sigterm_drains_and_exits_zero(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    """SIGTERM mid-burst: exit 0, offline, empty outbox, and no reading lost or taken twice.

    Every reading completes a window (hop 1) whose score is published, so the last score before
    the stop and the first after the restart show where the first run stopped taking readings.
    """
    n = 4000
    values = normal_series(n, seed=71)
    values[n // 2 : n // 2 + 200, FAULT_CHANNEL] += 10 * level_scales()[FAULT_CHANNEL]
    watcher = watch()
    daemon = oteo(alarm={"hop": 1}, topics={"publish_scores": True})
    wait_online(watcher, daemon.instance)
    pub = publisher()
    items = readings_for("burst", values)
    signalled_at = None
    for i, (topic, payload) in enumerate(items):
        pub.send(topic, payload)
        if signalled_at is None and i >= n // 4 and daemon.metrics()("oteo_windows_scored_total"):
            daemon.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
    pub.flush()
    assert signalled_at is not None
    assert daemon.wait_exit(15) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    assert "stopped" in log and "Traceback" not in log, log[-3000:]
    assert "not acknowledged" not in log, log[-3000:]

    status = retained(mosquitto, f"oteo/status/{daemon.instance}")
    assert status is not None and status.json()["state"] == "offline"
    outbox = Outbox(daemon.outbox_path, max_events=100, max_bytes=1 << 20)
    assert len(outbox) == 0
    outbox.close()
    first_run_scores = [unix(d["ts"]) for d in watcher.docs("oteo/burst/score")]
    assert first_run_scores, "no window scored before the stop"
    last_taken = int(max(first_run_scores) - T0)  # index of the last reading run 1 took
    assert last_taken < n - 1, "SIGTERM came after the burst: nothing to drain"

    # The rest of the burst waited at the broker; a new run takes exactly that.
    watcher.clear()
    daemon.start()
    rest = n - 1 - last_taken
    m = daemon.wait_metric(lambda m: m("oteo_readings_total") >= rest, 30, f"{rest} readings")
    time.sleep(0.5)  # observation period: no reading more may come (an absence is not awaited)
    m = daemon.metrics()
    assert m("oteo_readings_total") == rest, (
        f"run 1 took readings up to #{last_taken}; run 2 got {m('oteo_readings_total')}, "
        f"expected {rest}"
    )
    assert m("oteo_messages_total", result="duplicate") == 0
    assert m("oteo_messages_total", result="late") == 0
    assert m("oteo_seq_gaps_total") == 0
    second_run_scores = sorted(unix(d["ts"]) for d in watcher.docs("oteo/burst/score"))
    assert second_run_scores[0] == T0 + last_taken + demo.window
    assert daemon.stop() == 0


def test_bad_config_and_bad_model_exit_78_with_one_line(tmp_path: Path, demo_model: Path) -> None:
    def errors(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if line.startswith("error:")]

    base = daemon_config(tmp_path, "mqtt://127.0.0.1:1", demo_model)
    unknown = {**base, "mqtt": {**base["mqtt"], "bogus_key": 1}}
    config = tmp_path / "unknown.toml"
    config.write_text(toml_text(unknown), encoding="utf-8")
    result = run_oteo("run", "--config", str(config))
    assert result.returncode == 78, result.stderr
    assert len(errors(result.stderr)) == 1, result.stderr
    assert "mqtt.bogus_key" in errors(result.stderr)[0]
    assert "unknown key" in errors(result.stderr)[0]

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 100)
    config = tmp_path / "garbage.toml"
    config.write_text(toml_text({**base, "model": {"path": str(garbage)}}), encoding="utf-8")
    result = run_oteo("run", "--config", str(config))
    assert result.returncode == 78, result.stderr
    assert len(errors(result.stderr)) == 1, result.stderr
    assert str(garbage) in errors(result.stderr)[0]

    result = run_oteo(
        "run", "--model", str(tmp_path / "missing.onnx"), "--broker", "mqtt://127.0.0.1:1"
    )
    assert result.returncode == 78, result.stderr
    assert len(errors(result.stderr)) == 1 and "missing.onnx" in errors(result.stderr)[0]

    result = run_oteo("run")
    assert result.returncode == 2, result.stderr

    secret = "hunter2-" + uuid.uuid4().hex
    password = tmp_path / "mqtt-password"
    password.write_text(secret + "\n", encoding="utf-8")
    password.chmod(0o600)
    valid = {**base, "mqtt": {**base["mqtt"], "username": "oteo", "password_file": str(password)}}
    config = tmp_path / "valid.toml"
    config.write_text(toml_text(valid), encoding="utf-8")
    result = run_oteo("check-config", str(config))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert secret not in result.stdout
    assert effective["mqtt"]["password"].startswith("<redacted")
    assert effective["model"]["path"] == str(demo_model)
    assert effective["instance"] == base["instance"]
    assert effective["http"]["port"] == base["http"]["port"]

    result = run_oteo("check-config", str(tmp_path / "unknown.toml"))
    assert result.returncode == 78 and "mqtt.bogus_key" in result.stderr


def test_alarms_are_reconciled_when_a_mute_ends(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    """A mute hides alarm edges for a while; when it ends, state and events match the data.

    `begins`: a fault starts during the mute and is still there after it, so it is reported.
    `ends`: an alarm active when the mute starts ends during it, so its end is reported.
    """
    mute_s = 3.0
    window = demo.window
    big = 10 * level_scales()[FAULT_CHANNEL]
    watcher = watch()
    daemon = oteo()
    wait_online(watcher, daemon.instance)
    pub = publisher()
    normal = {name: normal_series(3 * window + 200, seed=81 + i) for i, name in enumerate("ab")}
    sent = {"begins": 0, "ends": 0}

    def send(stream: str, values: np.ndarray) -> None:
        pub.send_all(readings_for(stream, values, t0=T0 + sent[stream], first_seq=sent[stream]))
        sent[stream] += len(values)

    def mute(stream: str) -> None:
        status, doc = daemon.post_json("/v1/ops/mute", {"stream": stream, "duration_s": mute_s})
        assert status == 200 and doc["state"] == "muted", doc

    # `ends` goes into alarm first, unmuted.
    faulty = normal["b"][: window + 40].copy()
    faulty[window:, FAULT_CHANNEL] += big
    send("ends", faulty)
    start = watcher.wait_for(
        lambda _: [e for e in events(watcher, "ends") if e["kind"] == "start"], 10, "ends' start"
    )[0]
    send("begins", normal["a"][:window])  # normal: the stream exists before it is muted
    daemon.wait_metric(
        lambda m: m("oteo_readings_total") == sent["begins"] + sent["ends"], 10, "readings taken"
    )
    mute("ends")
    mute("begins")
    muted_at = time.monotonic()
    # During the mute: `begins` turns faulty, `ends` returns to normal for long enough to clear.
    begins = normal["a"][window : 2 * window + 40].copy()
    begins[:, FAULT_CHANNEL] += big
    send("begins", begins)
    send("ends", normal["b"][window + 40 : 3 * window + 80])
    daemon.wait_metric(
        lambda m: m("oteo_readings_total") == sent["begins"] + sent["ends"], 10, "readings taken"
    )
    assert events(watcher, "begins") == []

    # After the mute (it ends with the daemon's next once-a-second tick): more of the same data.
    def streams_now() -> dict[str, dict[str, Any]]:
        return {s["stream"]: s for s in json.loads(daemon.get("/v1/streams")[1])}

    assert wait_until(
        lambda: all(streams_now()[s]["state"] != "muted" for s in ("begins", "ends")), mute_s + 10
    ), f"still muted {time.monotonic() - muted_at:.1f} s after a {mute_s} s mute: {streams_now()}"
    more = normal["a"][2 * window + 40 : 2 * window + 80].copy()
    more[:, FAULT_CHANNEL] += big
    send("begins", more)
    send("ends", normal["b"][3 * window + 80 : 3 * window + 120])
    daemon.wait_metric(
        lambda m: m("oteo_readings_total") == sent["begins"] + sent["ends"], 10, "readings taken"
    )
    taken_at = time.monotonic()

    def reconciled() -> bool:
        ended = [e["kind"] for e in events(watcher, "ends")]
        began = [e["kind"] for e in events(watcher, "begins")]
        return "end" in ended and "start" in began

    wait_until(reconciled, 10)  # what arrived is asserted below
    # Observation period: a second end would have arrived by now.
    time.sleep(max(0.0, taken_at + 0.5 - time.monotonic()))
    listing = streams_now()
    report = (
        f"begins: {collapse(states(watcher, 'begins'))} "
        f"{[e['kind'] for e in events(watcher, 'begins')]}; "
        f"ends: {collapse(states(watcher, 'ends'))} {[e['kind'] for e in events(watcher, 'ends')]}"
    )
    assert listing["ends"]["state"] == "normal", report
    ended = [e for e in events(watcher, "ends") if e["kind"] == "end"]
    assert [e["event_id"] for e in ended] == [start["event_id"]], report
    assert listing["begins"]["state"] == "anomalous", report
    assert [e["kind"] for e in events(watcher, "begins")][:1] == ["start"], report
    assert daemon.stop() == 0


def test_it_says_what_it_does_while_it_runs(
    oteo: Callable[..., OteoProcess],
    publisher: Callable[..., Publisher],
    mosquitto: Broker,
    demo: Manifest,
) -> None:
    """At INFO: connects and losses with the reason, alarm start and end with the cause, reloads,
    and a periodic summary (issue 14 A.4: `oteo run` logged nothing after its start line)."""
    daemon = oteo(log={"summary_every_s": 1.0})
    values = shifted(normal_series(900, seed=21), FAULT_CHANNEL, 300, 300, seed=5)
    publisher().send_all(readings_for("loud", values))
    daemon.wait_metric(
        lambda m: m("oteo_events_total", kind="end") >= 1, 30, "the fault's start and end"
    )
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_metric(lambda m: m("oteo_model_reloads_total", result="ok") == 1, 10, "reload")
    mosquitto.restart()
    daemon.wait_metric(lambda m: m("oteo_mqtt_reconnects_total") >= 1, 20, "the reconnect")
    assert wait_until(lambda: "readings/s" in daemon.log_text(), 10), daemon.log_text()[-2000:]
    log = daemon.log_text()
    fault = demo.channels[FAULT_CHANNEL]
    expected = [
        rf"MQTT connected to {mosquitto.host}:{mosquitto.port} as \S+ \(session present: False\)",
        rf"stream loud: alarm \w+ started, score [\d.e+-]+ / threshold [\d.e+-]+; top: {fault}",
        rf"stream loud: alarm \w+ ended \(cleared\) after \d+ s, peak [\d.e+-]+; top: {fault}",
        r"reloaded \(SIGHUP\): model demo 1",
        r"MQTT connection to .* (lost|broker closed)",
        r"MQTT connected to .* after \d+ failed attempts|MQTT connected to .*session present: True",
        r"last \d+ s: \d+ streams \(.*\); [\d.]+ readings/s; \d+ alarms active; dropped: ",
    ]
    missing = [p for p in expected if not re.search(p, log)]
    assert not missing, f"{missing}\n--- log ---\n{log[-4000:]}"
    assert daemon.stop() == 0


def test_a_restart_keeps_each_streams_learnt_state_and_its_alarm(
    oteo: Callable[..., OteoProcess],
    watch: Callable[..., Watcher],
    publisher: Callable[..., Publisher],
    demo: Manifest,
) -> None:
    """state_dir/streams.json carries a stream's detector state and active alarm over a restart:
    the fault's end after the restart has the event id of its start before it."""
    watcher = watch()
    daemon = oteo()
    values = shifted(normal_series(1200, seed=31), FAULT_CHANNEL, 300, 300, seed=5)
    pub = publisher()
    pub.send_all(readings_for("kept", values[:500]))  # the fault is on when the daemon stops
    start = watcher.wait_for(
        lambda _: [e for e in events(watcher, "kept") if e["kind"] == "start"], 20, "the start"
    )[0]
    daemon.wait_metric(lambda m: m("oteo_readings_total") == 500, 20, "every reading taken")
    assert daemon.stop() == 0
    saved = json.loads((daemon.state_dir / "streams.json").read_text())
    assert saved["streams"]["kept"]["alarm"]["event_id"] == start["event_id"]

    daemon.start()
    assert "streams' saved states" in daemon.log_text()
    rest = readings_for("kept", values, t0=T0)[500:]
    pub.send_all(rest)
    end = watcher.wait_for(
        lambda _: [e for e in events(watcher, "kept") if e["kind"] == "end"], 30, "the end"
    )[0]
    assert end["event_id"] == start["event_id"] and end["reason"] == "cleared"
    assert [e["kind"] for e in events(watcher, "kept")].count("start") == 1
    assert daemon.stop() == 0
