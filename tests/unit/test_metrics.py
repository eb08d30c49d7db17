"""The daemon's metrics: valid exposition, names, series at 0 from the start, bounded labels."""

from __future__ import annotations

import re
import shutil
import subprocess

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import (
    OP_RESULTS,
    OTHER,
    PUBLISH_KINDS,
    Metrics,
)
from daemon.mqtt import CONNECT_FAILURE_KINDS
from daemon.request import OPS

STATES = ("normal", "anomalous", "stale", "warming_up", "muted")
NAME = re.compile(r"^oteo_[a-z0-9]+(_[a-z0-9]+)*$")


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every exposed sample, keyed by (sample name, labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def stream_series(metrics: Metrics) -> set[str]:
    return {
        dict(labels)["stream"] for name, labels in samples(metrics) if name == "oteo_stream_score"
    }


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool not found: install Debian's `prometheus` package (apt install prometheus)"
    )
    metrics = Metrics()
    # Exercise every kind of series, including per-stream and model ones.
    label = metrics.stream_label("pump-1")
    metrics.stream_score.labels(label).set(0.3)
    metrics.stream_threshold.labels(label).set(1.2)
    metrics.stream_anomalous.labels(label).set(0)
    metrics.set_model("pump", "3", "ab" * 32)
    metrics.inference_duration_seconds.observe(0.0004)
    metrics.http_requests_total.labels("/metrics", "200").inc()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        timeout=60,
    )
    complaints = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and not complaints, complaints


def test_names_follow_conventions() -> None:
    metrics = Metrics()
    metrics.set_model("pump", "3", "ab" * 32)
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, family in families.items():
        if name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        assert NAME.match(name), name
        if family.type == "counter":
            assert all(s.name == f"{name}_total" for s in family.samples if "created" not in s.name)
        else:
            assert not name.endswith("_total"), name
        assert not re.search(r"_(milliseconds|microseconds|kilobytes|megabytes)$", name), name
    # The parser strips `_total` from counter family names.
    expected = {
        "oteo_messages",
        "oteo_readings",
        "oteo_windows_scored",
        "oteo_seq_gaps",
        "oteo_gap_resets",
        "oteo_filled_samples",
        "oteo_aligner_incomplete",
        "oteo_inference_duration_seconds",
        "oteo_batch_size_windows",
        "oteo_queue_depth_messages",
        "oteo_event_latency_seconds",
        "oteo_events",
        "oteo_alarms_active",
        "oteo_streams",
        "oteo_outbox_events",
        "oteo_outbox_bytes",
        "oteo_outbox_dropped",
        "oteo_outbox_errors",
        "oteo_mqtt_connected",
        "oteo_mqtt_reconnects",
        "oteo_mqtt_connect_failures",
        "oteo_mqtt_published",
        "oteo_mqtt_publish_acks",
        "oteo_model_info",
        "oteo_model_reloads",
        "oteo_last_message_timestamp_seconds",
        "oteo_no_data",
        "oteo_stream_score",
        "oteo_stream_threshold",
        "oteo_stream_anomalous",
        "oteo_ops",
        "oteo_ops_duration_seconds",
        "oteo_http_requests",
        "oteo_drift_windows_above_p99_ratio",
        "oteo_build_info",
    }
    assert expected <= set(families), expected - set(families)


def test_fixed_label_values_exist_at_zero() -> None:
    metrics = Metrics()
    results = ["ok", "too_large", "not_json", "queue_full_qos0", "duplicate", "late"]
    for result in [*results, "unknown_stream_topic"]:
        assert value(metrics, "oteo_messages_total", result=result) == 0, result
    for kind in ("start", "update", "end"):
        assert value(metrics, "oteo_events_total", kind=kind) == 0, kind
    for state in STATES:
        assert value(metrics, "oteo_streams", state=state) == 0, state
    for reason in CONNECT_FAILURE_KINDS:
        assert value(metrics, "oteo_mqtt_connect_failures_total", reason=reason) == 0, reason
    for kind in PUBLISH_KINDS:
        assert value(metrics, "oteo_mqtt_published_total", kind=kind) == 0, kind
    for result in ("ok", "failed"):
        assert value(metrics, "oteo_model_reloads_total", result=result) == 0, result
    for op in OPS:
        assert value(metrics, "oteo_ops_duration_seconds_count", op=op) == 0, op
        for result in OP_RESULTS:
            assert value(metrics, "oteo_ops_total", op=op, result=result) == 0, (op, result)
    for name in ("oteo_outbox_dropped_total", "oteo_outbox_errors_total", "oteo_readings_total"):
        assert value(metrics, name) == 0, name
    assert value(metrics, "oteo_inference_duration_seconds_count") == 0
    assert value(metrics, "oteo_mqtt_connected") == 0


def test_every_event_kind_and_stream_state_is_initialised() -> None:
    from daemon.messages import EVENT_KINDS, STATES

    metrics = Metrics()
    for kind in EVENT_KINDS:
        assert value(metrics, "oteo_events_total", kind=kind) == 0, kind
    for state in STATES:
        assert value(metrics, "oteo_streams", state=state) == 0, state


def test_build_info_names_the_version() -> None:
    from daemon import __version__

    assert value(Metrics(), "oteo_build_info", version=__version__) == 1


def test_stream_labels_cap_and_pool_as_other() -> None:
    metrics = Metrics(max_stream_labels=3)
    labels = [metrics.stream_label(f"s{i}") for i in range(5)]
    assert labels == ["s0", "s1", "s2", OTHER, OTHER]
    # Stable: asking again never changes a label.
    assert [metrics.stream_label(f"s{i}") for i in (4, 0, 3)] == [OTHER, "s0", OTHER]
    for i in range(5):
        metrics.stream_score.labels(metrics.stream_label(f"s{i}")).set(i)
    assert stream_series(metrics) == {"s0", "s1", "s2", OTHER}


def test_stream_named_like_the_pool_is_pooled() -> None:
    metrics = Metrics(max_stream_labels=3)
    assert metrics.stream_label(OTHER) == OTHER
    assert metrics.stream_label("a") == "a"


def test_zero_stream_labels_pools_everything() -> None:
    metrics = Metrics(max_stream_labels=0)
    assert metrics.stream_label("a") == OTHER


def test_forget_stream_removes_its_series_and_frees_its_slot() -> None:
    metrics = Metrics(max_stream_labels=2)
    for stream in ("a", "b", "c"):
        label = metrics.stream_label(stream)
        metrics.stream_score.labels(label).set(1)
        metrics.stream_threshold.labels(label).set(2)
        metrics.stream_anomalous.labels(label).set(0)
    metrics.forget_stream("a")
    metrics.forget_stream("c")  # pooled: `_other` stays
    metrics.forget_stream("never-seen")
    assert stream_series(metrics) == {"b", OTHER}
    names = {name for name, labels in samples(metrics) if ("stream", "a") in labels}
    assert names == set()
    # The freed slot goes to the next new stream; "b" keeps its label.
    assert metrics.stream_label("d") == "d"
    assert metrics.stream_label("e") == OTHER
    assert metrics.stream_label("b") == "b"


def test_forget_stream_without_series_is_harmless() -> None:
    metrics = Metrics()
    metrics.stream_label("a")
    metrics.forget_stream("a")
    assert stream_series(metrics) == set()


def test_set_model_replaces_the_old_info_series() -> None:
    metrics = Metrics()
    assert not any(name == "oteo_model_info" for name, _ in samples(metrics))
    metrics.set_model("pump", "1", "aa" * 32)
    metrics.set_model("pump", "2", "bb" * 32)
    info = {
        labels: v for (name, labels), v in samples(metrics).items() if name == "oteo_model_info"
    }
    assert info == {frozenset({("name", "pump"), ("version", "2"), ("sha256", "bb" * 32)}): 1}


def test_registries_are_private() -> None:
    before = set(REGISTRY._names_to_collectors)
    first, second = Metrics(), Metrics()
    first.readings_total.inc()
    assert value(second, "oteo_readings_total") == 0
    assert set(REGISTRY._names_to_collectors) == before


def test_the_metrics_reference_page_is_generated_from_the_code() -> None:
    from pathlib import Path

    from daemon.reference import metrics_markdown

    page = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert page.read_text() == metrics_markdown(), "run: python -m daemon.reference docs/metrics.md"
    names = [
        f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()
    ]
    assert all(f"`{n}`" in page.read_text() for n in names)
