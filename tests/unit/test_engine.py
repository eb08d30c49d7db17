"""The main loop's logic with a real (tiny) exported model and no MQTT: publishes are captured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.config import load_config
from daemon.engine import Engine, Work
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.reading import ParsedReading


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Capture:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict | None, bool, bool]] = []

    def __call__(self, topic: str, payload: bytes, *, qos: int, retain: bool, durable: bool):
        self.messages.append((topic, json.loads(payload) if payload else None, retain, durable))

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
def model(tiny_model_path: Path) -> Model:
    return Model.load(tiny_model_path)


@pytest.fixture(scope="module")
def normal_rows() -> np.ndarray:
    from training.simulator import MachineSimulator

    return MachineSimulator(seed=5).step(400)


def make_engine(
    model: Model, tmp_path: Path, **overrides: object
) -> tuple[Engine, Capture, Metrics, Clock]:
    cfg = load_config(
        None,
        {"model.path": str(model.path), "state_dir": str(tmp_path), "instance": "t", **overrides},
    )
    metrics = Metrics(max_stream_labels=10)
    capture, clock = Capture(), Clock()
    return Engine(model, cfg, capture, metrics, clock=clock), capture, metrics, clock


def feed(engine: Engine, stream: str, rows: np.ndarray, t0: float = 0.0, seq0: int = 0) -> None:
    readings = [ParsedReading(t0 + i, seq0 + i, row) for i, row in enumerate(rows)]
    for i in range(0, len(readings), 50):
        engine.handle(Work(stream, readings[i : i + 50]))
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
    assert all(e["schema"] == 1 for e in events)
    assert "anomalous" in capture.states("a")
    assert capture.states("a")[-1] == "normal"
    assert capture.events("b") == []
    assert all(durable for t, _, _, durable in capture.messages if t.endswith("/event"))


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


def test_mute_suppresses_events_and_publishes_muted(model, normal_rows, tmp_path):
    engine, capture, _, _ = make_engine(model, tmp_path)
    engine.mute("a", 3600)
    rows = normal_rows.copy()
    rows[100:200, 1] += 50 * model.manifest.channel_scale[1]
    feed(engine, "a", rows)
    assert capture.events("a") == []
    assert capture.states("a")[-1] == "muted"


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


def test_model_swap_scores_every_window_once(model, normal_rows, tmp_path):
    engine, _, metrics, _ = make_engine(model, tmp_path)
    readings = [ParsedReading(float(i), i, row) for i, row in enumerate(normal_rows[:100])]
    engine.handle(Work("a", readings[:60]))  # windows queued, not yet scored
    engine.use_model(Model.load(model.path))
    engine.handle(Work("a", readings[60:]))
    engine.score_pending()
    assert value(metrics, "oteo_windows_scored_total") == 100 - model.window + 1


def test_a_ready_window_waits_at_most_max_wait_s_for_a_batch(model, normal_rows, tmp_path):
    """Under a steady stream the queue never runs dry: windows go after `scoring.max_wait_s`
    even when the batch is not full."""
    engine, _, metrics, clock = make_engine(
        model, tmp_path, **{"scoring.max_batch": 256, "scoring.max_wait_s": 0.02}
    )
    w = model.window
    engine.handle(Work("a", [ParsedReading(float(i), i, normal_rows[i]) for i in range(w)]))
    assert value(metrics, "oteo_windows_scored_total") == 0  # one window, waiting for others
    clock.now += 0.01
    engine.handle(Work("a", [ParsedReading(float(w), w, normal_rows[w])]))
    assert value(metrics, "oteo_windows_scored_total") == 0  # 10 ms: still waiting
    clock.now += 0.015
    engine.handle(Work("b", [ParsedReading(0.0, 0, normal_rows[0])]))  # no new window
    assert value(metrics, "oteo_windows_scored_total") == 2  # the first waited 25 ms
