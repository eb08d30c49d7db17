"""The main loop's logic with a stub scorer and no MQTT: outputs go through the real Publisher
into a list, so topics, retain flags and payloads are checked as they would be sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scorer_stub import StubScorer, stub_for

from daemon.config import load_config
from daemon.control import apply, describe
from daemon.engine import Engine
from daemon.intake import Work, new_layout
from daemon.metrics import Metrics
from daemon.mqtt import Outgoing
from daemon.publisher import Publisher, Topics
from daemon.reading import ParsedReading
from training.simulator import MachineSimulator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Capture:
    """What the publisher would hand to the MQTT link: (topic, payload, retain, durable)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict | None, bool, bool]] = []

    def __call__(self, msg: Outgoing) -> None:
        payload = json.loads(msg.payload) if msg.payload else None
        self.messages.append((msg.topic, payload, msg.retain, msg.durable))

    def events(self, stream: str | None = None) -> list[dict]:
        return [
            p
            for t, p, _, _ in self.messages
            if t.endswith("/event") and p and (stream is None or p["stream"] == stream)
        ]

    def states(self, stream: str) -> list[str | None]:
        return [
            p["state"] if p else None for t, p, _, _ in self.messages if t == f"oteo/{stream}/state"
        ]


@pytest.fixture(scope="module")
def normal_rows() -> np.ndarray:
    return MachineSimulator(seed=5).step(400)


@pytest.fixture(scope="module")
def model(normal_rows: np.ndarray) -> StubScorer:
    return stub_for(normal_rows, [f"ch{i}" for i in range(normal_rows.shape[1])])


def make_engine(
    model: StubScorer, tmp_path: Path, **overrides: object
) -> tuple[Engine, Capture, Metrics, Clock]:
    cfg = load_config(
        None,
        {"model.path": str(tmp_path / "m.onnx"), "state_dir": str(tmp_path), "instance": "t"}
        | overrides,
    )
    metrics = Metrics(max_stream_labels=10)
    capture, clock = Capture(), Clock()
    publisher = Publisher(Topics("sensors", "oteo", "t"), capture, metrics, qos=1)
    return Engine(model, cfg, publisher, metrics, clock=clock), capture, metrics, clock


def work(model: StubScorer, stream: str, readings: list[ParsedReading]) -> Work:
    return Work(stream, readings, new_layout(model.manifest.channels), size=len(readings))


def feed(engine: Engine, stream: str, rows: np.ndarray, t0: float = 0.0, seq0: int = 0) -> None:
    readings = [ParsedReading(t0 + i, seq0 + i, row) for i, row in enumerate(rows)]
    for i in range(0, len(readings), 50):
        engine.handle(work(engine.model, stream, readings[i : i + 50]))  # type: ignore[arg-type]
    engine.score_pending()


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_stream_warms_up_then_turns_normal(model, normal_rows, tmp_path):
    engine, capture, metrics, _ = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[: model.window - 1])
    assert capture.states("a") == ["warming_up"]
    feed(engine, "a", normal_rows[model.window - 1 : model.window + 20], t0=model.window - 1)
    assert capture.states("a") == ["warming_up", "normal"]
    assert value(metrics, "oteo_windows_scored_total") == 21  # window + 20 samples


def test_fault_raises_one_start_and_one_end_with_one_event_id_naming_the_channel(
    model, normal_rows, tmp_path
):
    engine, capture, _, _ = make_engine(model, tmp_path)
    rows = normal_rows.copy()
    rows[150:230, 2] += 50 * model.manifest.channel_scale[2]  # far beyond anything normal
    feed(engine, "a", rows)
    feed(engine, "b", normal_rows)
    events = capture.events("a")
    kinds = [e["kind"] for e in events]
    # Updates repeat the peak while the alarm lasts (every EVENT_UPDATE_S of data time).
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"update"}
    assert len({e["event_id"] for e in events}) == 1
    assert events[0]["top_channels"][0]["channel"] == model.manifest.channels[2]
    assert events[0]["top_channels"][0]["direction"] == "high"
    assert 0.0 <= events[0]["p_value"] <= 1.0
    # A model file without moving thresholds: every message names its calibrated threshold.
    calibrated = (model.manifest.alarm.enter_threshold, "calibrated")
    assert {(e["threshold"], e["threshold_source"]) for e in events} == {calibrated}
    (row,) = [r for r in describe(engine) if r["stream"] == "a"]
    assert (row["threshold"], row["threshold_source"]) == calibrated
    assert all(e["schema"] == 1 for e in events)
    assert "anomalous" in capture.states("a")
    assert capture.states("a")[-1] == "normal"
    assert capture.events("b") == []
    assert all(durable for t, _, _, durable in capture.messages if t.endswith("/event"))


def test_every_event_of_an_alarm_names_the_channels_of_its_peak(model, normal_rows, tmp_path):
    """The end event names the cause (the peak window), not the last, already normal window."""
    engine, capture, _, _ = make_engine(model, tmp_path)
    rows = normal_rows.copy()
    scale = np.array(model.manifest.channel_scale)
    rows[150:230, 3] += 30 * scale[3]  # the fault: channel 3
    rows[226:240, 5] += 3.5 * scale[5]  # a smaller wobble on 5 as the fault ends
    feed(engine, "a", rows)
    start, *_, end = capture.events("a")
    assert end["kind"] == "end"
    assert start["top_channels"][0]["channel"] == end["top_channels"][0]["channel"] == "ch3"
    assert end["peak_score"] == max(e["peak_score"] for e in capture.events("a"))
    assert end["peak_score"] >= end["score"]
    assert end["duration_s"] == pytest.approx(_seconds(end["ended"]) - _seconds(end["started"]))
    assert end["duration_s"] > 60
    assert start["duration_s"] is None


def _seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_duplicate_seq_is_counted_and_not_scored(model, normal_rows, tmp_path):
    engine, _, metrics, _ = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:40])
    scored = value(metrics, "oteo_windows_scored_total")
    feed(engine, "a", normal_rows[30:40], t0=30, seq0=30)  # a QoS 1 redelivery
    assert value(metrics, "oteo_messages_total", result="duplicate") == 10
    assert value(metrics, "oteo_windows_scored_total") == scored


def test_gap_longer_than_allowed_restarts_the_window(model, normal_rows, tmp_path):
    engine, _, metrics, _ = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:40])
    scored = value(metrics, "oteo_windows_scored_total")
    feed(engine, "a", normal_rows[40:60], t0=1000.0, seq0=40)  # a 960 s hole
    assert value(metrics, "oteo_gap_resets_total") == 1
    # 20 samples after the hole are fewer than a window: nothing scored across it.
    assert value(metrics, "oteo_windows_scored_total") == scored + max(0, 20 - model.window + 1)


def test_silent_stream_goes_stale_not_anomalous(model, normal_rows, tmp_path):
    engine, capture, _, clock = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:40])
    clock.now += 3600
    engine.tick()
    assert capture.states("a")[-1] == "stale"
    assert capture.events("a") == []


def test_a_stream_cut_off_past_stale_after_keeps_its_window(model, normal_rows, tmp_path):
    # A partition's backlog arriving after a failover: silent on this host for longer than
    # stale_after_s, yet on the same grid. Its windows go on; no gap reset, no warm-up.
    engine, capture, metrics, clock = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:40])
    scored = value(metrics, "oteo_windows_scored_total")
    clock.now += 3600
    engine.tick()
    assert capture.states("a")[-1] == "stale"
    feed(engine, "a", normal_rows[40:45], t0=40, seq0=40)
    assert value(metrics, "oteo_windows_scored_total") == scored + 5
    assert value(metrics, "oteo_gap_resets_total") == 0
    assert capture.states("a")[-1] == "normal"


def test_a_real_gap_after_going_stale_still_restarts_the_window(model, normal_rows, tmp_path):
    engine, _, metrics, clock = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:40])
    scored = value(metrics, "oteo_windows_scored_total")
    clock.now += 3600
    engine.tick()
    feed(engine, "a", normal_rows[40:45], t0=3640, seq0=40)  # an hour missing in data time
    assert value(metrics, "oteo_gap_resets_total") == 1
    assert value(metrics, "oteo_windows_scored_total") == scored


def test_readings_redelivered_on_a_partition_are_counted_as_duplicates(
    model, normal_rows, tmp_path
):
    engine, _, metrics, _ = make_engine(model, tmp_path)

    def push(rows: np.ndarray, t0: int, seq: bool) -> None:
        readings = [
            ParsedReading(float(t0 + i), t0 + i if seq else None, row) for i, row in enumerate(rows)
        ]
        w = work(model, "a", readings)
        w.partition = 3
        engine.handle(w)

    push(normal_rows[:60], 0, seq=True)
    accepted = value(metrics, "oteo_readings_total")
    push(normal_rows[10:20], 10, seq=True)  # in the window: duplicates by slot and seq
    # Beyond the window, without seq: by timestamp; a window's worth of them in a row would
    # otherwise read as a clock that jumped back (and restart the window).
    push(normal_rows[:30], 0, seq=False)
    assert value(metrics, "oteo_redelivered_duplicates_total") == 40
    assert value(metrics, "oteo_readings_total") == accepted
    assert value(metrics, "oteo_gap_resets_total") == 0  # no "clock jumped back" restart
    assert value(metrics, "oteo_messages_total", result="late") == 0


def test_readings_redelivered_after_newer_ones_are_counted_as_lost_not_seen(
    model, normal_rows, tmp_path
):
    # After a crash the broker may redeliver what the dead owner never acknowledged *after*
    # newer readings (the restarted daemon connected too soon): their slots were interpolated,
    # so they were never taken. Dropped (the window moved on), but counted as lost.
    engine, _, metrics, _ = make_engine(model, tmp_path)

    def push(rows: np.ndarray, t0: int) -> None:
        readings = [ParsedReading(float(t0 + i), t0 + i, row) for i, row in enumerate(rows)]
        w = work(model, "a", readings)
        w.partition = 3
        engine.handle(w)

    push(normal_rows[:50], 0)
    push(normal_rows[53:60], 53)  # 50..52 not delivered yet: interpolated
    accepted = value(metrics, "oteo_readings_total")
    push(normal_rows[50:53], 50)
    push(normal_rows[55:57], 55)  # and two true duplicates
    assert value(metrics, "oteo_redelivered_late_total") == 3
    assert value(metrics, "oteo_messages_total", result="late") == 3
    assert value(metrics, "oteo_redelivered_duplicates_total") == 2
    assert value(metrics, "oteo_readings_total") == accepted
    assert value(metrics, "oteo_gap_resets_total") == 0
    # Off partitions the same readings are late too, but no evidence of a clock that jumped
    # back (a run of those restarts the window).
    feed(engine, "b", normal_rows[:50])
    feed(engine, "b", normal_rows[53:60], t0=53, seq0=53)
    engine.handle(
        work(model, "b", [ParsedReading(50.0 + i, None, normal_rows[50 + i]) for i in range(3)])
    )
    assert value(metrics, "oteo_messages_total", result="late") == 6
    assert value(metrics, "oteo_redelivered_late_total") == 3
    assert engine.streams["b"].late_run == 0


def test_mute_suppresses_events_and_publishes_muted(model, normal_rows, tmp_path):
    engine, capture, _, _ = make_engine(model, tmp_path)
    feed(engine, "a", normal_rows[:20])
    assert apply(engine, "mute", {"stream": "a", "duration_s": 3600.0})[0] == 200
    rows = normal_rows.copy()
    rows[100:200, 1] += 50 * model.manifest.channel_scale[1]
    feed(engine, "a", rows[20:], t0=20, seq0=20)
    assert capture.events("a") == []
    assert capture.states("a")[-1] == "muted"


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("mute", {"duration_s": 60.0}),
        ("unmute", {}),
        ("sensitivity", {"factor": 2.0}),
    ],
)
def test_a_control_for_an_unknown_stream_is_not_found_and_creates_nothing(
    model, normal_rows, tmp_path, op, args
):
    engine, capture, _, clock = make_engine(model, tmp_path, **{"ingest.max_streams": 2})
    feed(engine, "a", normal_rows[:5])
    clock.now += 1
    feed(engine, "b", normal_rows[:5])
    status, body = apply(engine, op, {"stream": "nobody", "id": "r1", **args})
    reply = json.loads(body)
    assert status == 404 and reply["error"] == "not_found" and reply["id"] == "r1"
    assert sorted(engine.streams) == ["a", "b"]  # nothing created, nothing evicted
    assert capture.states("nobody") == []


def test_max_streams_evicts_least_recent_and_clears_its_retained_state(
    model, normal_rows, tmp_path
):
    engine, capture, _, clock = make_engine(model, tmp_path, **{"ingest.max_streams": 2})
    feed(engine, "a", normal_rows[:5])
    clock.now += 1
    feed(engine, "b", normal_rows[:5])
    clock.now += 1
    feed(engine, "c", normal_rows[:5])
    assert sorted(engine.streams) == ["b", "c"]
    _topic, payload, retain, _ = [m for m in capture.messages if m[0] == "oteo/a/state"][-1]
    assert payload is None and retain  # an empty retained message clears it on the broker


def test_scores_do_not_depend_on_batching(model, normal_rows, tmp_path):
    small, cap_small, _, _ = make_engine(
        model, tmp_path, **{"scoring.max_batch": 1, "topics.publish_scores": True}
    )
    big, cap_big, _, _ = make_engine(
        model, tmp_path, **{"scoring.max_batch": 256, "topics.publish_scores": True}
    )
    for engine in (small, big):
        for name in ("a", "b", "c"):
            feed(engine, name, normal_rows[:80])

    def scores(capture: Capture) -> dict[tuple[str, str], float]:
        return {
            (p["stream"], p["ts"]): p["score"]
            for t, p, _, _ in capture.messages
            if t.endswith("/score")
        }

    assert scores(cap_small) == scores(cap_big)
    assert len(scores(cap_big)) == 3 * (80 - model.window + 1)


def test_a_window_queued_behind_an_evicted_streams_is_scored_as_its_own(
    model, normal_rows, tmp_path
):
    w = model.window
    alone, cap_alone, _, _ = make_engine(model, tmp_path, **{"topics.publish_scores": True})
    feed(alone, "b", normal_rows[:w])
    engine, capture, _, clock = make_engine(
        model,
        tmp_path,
        **{"ingest.max_streams": 2, "scoring.max_wait_s": 1000.0, "topics.publish_scores": True},
    )
    far_off = normal_rows[:w] + 100.0
    for name, rows in (("a", far_off), ("b", normal_rows[:w]), ("c", normal_rows[100 : 100 + w])):
        readings = [ParsedReading(float(i), i, row) for i, row in enumerate(rows)]
        engine.handle(work(model, name, readings))  # one window each, queued: the batch waits
        clock.now += 1
    assert sorted(engine.streams) == ["b", "c"]  # c's first reading evicted a, window queued

    engine.score_pending()

    def scores(capture: Capture, stream: str) -> list[float]:
        return [p["score"] for t, p, _, _ in capture.messages if t == f"oteo/{stream}/score"]

    assert scores(capture, "b") == scores(cap_alone, "b")  # not a's far-off window's score
    assert len(scores(capture, "c")) == 1


def test_model_swap_scores_every_window_once(model, normal_rows, tmp_path):
    engine, _, metrics, _ = make_engine(model, tmp_path)
    readings = [ParsedReading(float(i), i, row) for i, row in enumerate(normal_rows[:100])]
    engine.handle(work(model, "a", readings[:60]))  # windows queued, not yet scored
    twin = StubScorer(model.manifest)
    engine.use_model(twin)
    assert model.runs and twin.runs == 0  # the queued windows went to the old model first
    engine.handle(work(model, "a", readings[60:]))
    engine.score_pending()
    assert value(metrics, "oteo_windows_scored_total") == 100 - model.window + 1
    assert value(metrics, "oteo_messages_total", result="model_changed") == 0


def test_readings_parsed_for_other_channels_are_dropped_and_counted(model, normal_rows, tmp_path):
    """A reload to a model with other channels: readings already queued for the old one are
    counted as `model_changed`, never pushed into windows of the wrong width."""
    engine, _, metrics, _ = make_engine(model, tmp_path)
    old = [ParsedReading(float(i), i, row) for i, row in enumerate(normal_rows[:30])]
    feed(engine, "a", normal_rows[:30])
    narrow = stub_for(normal_rows[:, :3], ["ch0", "ch1", "ch2"], window=8)
    engine.use_model(narrow)
    engine.handle(work(model, "a", old[:5]))  # queued before the reload: 8 values each
    assert value(metrics, "oteo_messages_total", result="model_changed") == 5
    fresh = [ParsedReading(100.0 + i, 100 + i, row[:3]) for i, row in enumerate(normal_rows[:20])]
    engine.handle(work(narrow, "a", fresh))
    engine.score_pending()
    assert narrow.runs and value(metrics, "oteo_readings_total") == 30 + 20


def test_a_ready_window_waits_at_most_max_wait_s_for_a_batch(model, normal_rows, tmp_path):
    """Under a steady stream the queue never runs dry: windows go after `scoring.max_wait_s`
    even when the batch is not full."""
    engine, _, metrics, clock = make_engine(
        model, tmp_path, **{"scoring.max_batch": 256, "scoring.max_wait_s": 0.02}
    )
    w = model.window
    engine.handle(work(model, "a", [ParsedReading(float(i), i, normal_rows[i]) for i in range(w)]))
    assert value(metrics, "oteo_windows_scored_total") == 0  # one window, waiting for others
    clock.now += 0.01
    engine.handle(work(model, "a", [ParsedReading(float(w), w, normal_rows[w])]))
    assert value(metrics, "oteo_windows_scored_total") == 0  # 10 ms: still waiting
    clock.now += 0.015
    engine.handle(work(model, "b", [ParsedReading(0.0, 0, normal_rows[0])]))  # no new window
    assert value(metrics, "oteo_windows_scored_total") == 2  # the first waited 25 ms


def test_a_sustained_change_ends_as_a_visible_new_normal(normal_rows, tmp_path):
    """With `new_normal_s` set, an alarm that lasts that long ends with reason new_normal (and
    the stream reads normal at the new level), never silently."""
    from daemon.manifest import Detection

    detection = Detection(new_normal_s=120.0, baseline_samples=600, baseline_seed=1.0)
    model = stub_for(normal_rows, [f"ch{i}" for i in range(8)], detection=detection)
    engine, capture, _, _ = make_engine(model, tmp_path)
    rows = normal_rows.copy()
    rows[100:, 4] += 20 * model.manifest.channel_scale[4]  # a new level from row 100 on
    feed(engine, "a", rows)
    events = capture.events("a")
    assert [e["kind"] for e in events if e["kind"] != "update"] == ["start", "end"]
    end = events[-1]
    assert end["reason"] == "new_normal"
    assert 120 - 1 <= end["duration_s"] <= 120 + model.window  # counted in windows of 1 s
    assert capture.states("a")[-1] == "normal"


def test_an_alarm_survives_a_restart_with_its_event_id(model, normal_rows, tmp_path):
    """The stream's saved state (detector and alarm) is taken up when it reports again."""
    from daemon.memory import StreamMemory

    rows = normal_rows.copy()
    rows[150:300, 2] += 50 * model.manifest.channel_scale[2]
    first, capture1, _, _ = make_engine(model, tmp_path)
    first.memory = StreamMemory(tmp_path, model.sha256)
    feed(first, "a", rows[:200])  # in alarm when it stops
    (start,) = [e for e in capture1.events("a") if e["kind"] == "start"]
    first.memory.save(first.streams.values(), limit=10)

    second, capture2, _, _ = make_engine(model, tmp_path)
    second.memory = StreamMemory(tmp_path, model.sha256)
    assert second.memory.load() == 1
    feed(second, "a", rows[200:], t0=200.0, seq0=200)
    events = capture2.events("a")
    assert [e["kind"] for e in events if e["kind"] != "update"] == ["end"]  # no second start
    assert events[-1]["event_id"] == start["event_id"] and events[-1]["reason"] == "cleared"
    assert events[-1]["started"] == start["started"]


def test_saved_states_of_another_model_are_not_used(model, normal_rows, tmp_path):
    from daemon.memory import StreamMemory

    engine, _, _, _ = make_engine(model, tmp_path)
    engine.memory = StreamMemory(tmp_path, model.sha256)
    feed(engine, "a", normal_rows[:50])
    engine.memory.save(engine.streams.values(), limit=10)
    assert StreamMemory(tmp_path, "f" * 64).load() == 0
    (tmp_path / "streams.json").write_text("{not json")
    assert StreamMemory(tmp_path, model.sha256).load() == 0


def test_an_alarm_active_when_the_model_changes_shape_ends_named_by_the_old_model(
    model, normal_rows, tmp_path
):
    engine, capture, _, _ = make_engine(model, tmp_path)
    rows = normal_rows.copy()
    rows[100:200, 6] += 50 * model.manifest.channel_scale[6]
    feed(engine, "a", rows[:150])
    narrow = stub_for(normal_rows[:, :3], ["x0", "x1", "x2"], window=8)
    engine.use_model(narrow)
    end = capture.events("a")[-1]
    assert end["kind"] == "end" and end["reason"] == "interrupted"
    assert end["top_channels"][0]["channel"] == "ch6"
    assert end["model"]["sha256"] == model.sha256
