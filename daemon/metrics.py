"""Every Prometheus metric of the daemon, on a private registry.

Names follow `oteo_<noun>_<unit>` with base units; counters end in `_total`. Every fixed label
value is created at start-up so its series exists at 0 (a `rate()` or an alert over a series that
appears only on the first failure misses that failure). Per-stream series are capped: the first
`max_stream_labels` streams get their own label value, later ones share `_other`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon import __version__
from daemon.messages import EVENT_KINDS, LABELS, STATES
from daemon.mqtt import CONNECT_FAILURE_KINDS
from daemon.reading import DROP_REASONS
from daemon.request import OPS, ErrorCode, MemoryOp

OTHER = "_other"

MESSAGE_RESULTS = (
    "ok",
    "queue_full_qos0",
    "duplicate",
    "late",
    "unknown_stream_topic",
    "model_changed",  # parsed for a model with other channels, queued before a reload
    "internal_error",  # raised an unexpected error in the main loop (logged)
)
"""`messages_total` results besides the payload drop reasons."""
ERROR_STAGES = ("intake", "engine", "scoring", "control", "journal", "checkpoint")

PUBLISH_KINDS = ("event", "state", "score", "status", "reply")
RELOAD_RESULTS = ("ok", "failed")
OP_RESULTS = ("ok", *get_args(ErrorCode))

# Inference of a small autoencoder on a CPU takes from tens of microseconds (one window) to
# hundreds of milliseconds (a large batch on a slow ARM board).
INFERENCE_BUCKETS_S = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 … 1024 windows
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OP_BUCKETS_S = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    """The daemon's metrics; the attributes are prometheus_client objects, used directly."""

    def __init__(self, *, max_stream_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.max_stream_labels = max_stream_labels
        self._stream_labels: dict[str, str] = {}
        self._own_labels = 0
        self._add_intake()
        self._add_scoring()
        self._add_alarms()
        self._add_outbox_and_mqtt()
        self._add_model()
        self._add_recorder()
        self._add_ops()
        self._add_partitions()

    def _counter(self, name: str, text: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, text, list(labels), registry=self.registry)

    def _gauge(self, name: str, text: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, text, list(labels), registry=self.registry)

    def _histogram(
        self, name: str, text: str, buckets: Iterable[float], labels: Iterable[str] = ()
    ) -> Histogram:
        return Histogram(name, text, list(labels), buckets=tuple(buckets), registry=self.registry)

    def _add_intake(self) -> None:
        self.messages_total = self._counter(
            "oteo_messages_total",
            "MQTT messages received, by result: ok or why it was dropped.",
            ["result"],
        )
        _touch(self.messages_total, _unique([*MESSAGE_RESULTS, *DROP_REASONS]))
        self.readings_total = self._counter(
            "oteo_readings_total", "Valid readings taken into window buffers."
        )
        self.seq_gaps_total = self._counter(
            "oteo_seq_gaps_total", "Readings missing by their seq numbers."
        )
        self.gap_resets_total = self._counter(
            "oteo_gap_resets_total", "Window buffers restarted after a time gap."
        )
        self.filled_samples_total = self._counter(
            "oteo_filled_samples_total", "Samples filled in for short gaps."
        )
        self.aligner_incomplete_total = self._counter(
            "oteo_aligner_incomplete_total",
            "Sample periods dropped because a per-channel topic did not deliver in time.",
        )
        self.queue_depth_messages = self._gauge(
            "oteo_queue_depth_messages",
            "Messages waiting in the ingest queue (its deepest point in the last second).",
        )
        self.last_message_timestamp_seconds = self._gauge(
            "oteo_last_message_timestamp_seconds", "Unix time of the last valid reading."
        )
        self.no_data = self._gauge(
            "oteo_no_data",
            "1 when no valid reading arrived for longer than the configured threshold.",
        )
        self.errors_total = self._counter(
            "oteo_errors_total",
            "Unexpected errors, by stage; the item is dropped (and logged), the daemon goes on.",
            ["stage"],
        )
        _touch(self.errors_total, ERROR_STAGES)

    def _add_scoring(self) -> None:
        self.windows_scored_total = self._counter(
            "oteo_windows_scored_total", "Windows scored by the model."
        )
        self.inference_duration_seconds = self._histogram(
            "oteo_inference_duration_seconds",
            "Duration of one model run (one batch).",
            INFERENCE_BUCKETS_S,
        )
        self.batch_size_windows = self._histogram(
            "oteo_batch_size_windows", "Windows per model run.", BATCH_BUCKETS
        )
        self.drift_windows_above_p99_ratio = self._gauge(
            "oteo_drift_windows_above_p99_ratio",
            "Share of the last hour's windows scoring above the 99th percentile of normal "
            "held-back data (about 0.01 while the data still looks like training data).",
        )

    def _add_alarms(self) -> None:
        self.events_total = self._counter(
            "oteo_events_total", "Anomaly events emitted, by kind.", ["kind"]
        )
        _touch(self.events_total, EVENT_KINDS)
        self.event_latency_seconds = self._histogram(
            "oteo_event_latency_seconds",
            "From the arrival of the reading that completed a window to its event being queued "
            "for publishing.",
            LATENCY_BUCKETS_S,
        )
        self.alarms_active = self._gauge("oteo_alarms_active", "Streams with an active alarm.")
        # `oteo_streams`, not `oteo_streams_count`: `_count` is reserved for the sample count
        # of histograms and summaries (promtool flags it), and a count of things has no unit.
        self.streams = self._gauge("oteo_streams", "Streams tracked, by state.", ["state"])
        _touch(self.streams, STATES)
        # Per stream, capped (see stream_label); few series per stream on purpose.
        self.stream_score = self._gauge(
            "oteo_stream_score",
            "Latest window score of a stream (for _other: of whichever pooled stream was last).",
            ["stream"],
        )
        self.stream_threshold = self._gauge(
            "oteo_stream_threshold",
            "Alarm threshold of a stream's score, after its sensitivity.",
            ["stream"],
        )
        self.stream_readings_total = self._counter(
            "oteo_stream_readings_total",
            "Readings a stream's window took (duplicates and late ones not counted).",
            ["stream"],
        )
        self.stream_windows_total = self._counter(
            "oteo_stream_windows_total", "Windows of a stream that were scored.", ["stream"]
        )
        self.stream_anomalous = self._gauge(
            "oteo_stream_anomalous",
            "1 while a stream is in alarm (for _other: as last written by a pooled stream).",
            ["stream"],
        )

    def _add_outbox_and_mqtt(self) -> None:
        self.outbox_events = self._gauge(
            "oteo_outbox_events", "Events in the outbox, not yet acknowledged."
        )
        self.outbox_bytes = self._gauge("oteo_outbox_bytes", "Payload bytes in the outbox.")
        self.outbox_dropped_total = self._counter(
            "oteo_outbox_dropped_total", "Oldest events dropped from a full outbox."
        )
        self.outbox_errors_total = self._counter(
            "oteo_outbox_errors_total", "Outbox failures (disk full, read-only, corrupt file)."
        )
        self.mqtt_connected = self._gauge(
            "oteo_mqtt_connected", "1 while the broker has accepted the connection."
        )
        self.mqtt_reconnects_total = self._counter(
            "oteo_mqtt_reconnects_total", "Connections made after the first."
        )
        self.mqtt_connect_failures_total = self._counter(
            "oteo_mqtt_connect_failures_total", "Failed connection attempts, by reason.", ["reason"]
        )
        _touch(self.mqtt_connect_failures_total, CONNECT_FAILURE_KINDS)
        self.mqtt_published_total = self._counter(
            "oteo_mqtt_published_total", "Messages handed to the broker, by kind.", ["kind"]
        )
        _touch(self.mqtt_published_total, PUBLISH_KINDS)
        self.mqtt_publish_acks_total = self._counter(
            "oteo_mqtt_publish_acks_total", "QoS 1 publications acknowledged by the broker."
        )
        self.mqtt_publish_dropped_total = self._counter(
            "oteo_mqtt_publish_dropped_total",
            "Messages not published, by reason: not_connected (window scores, states and replies "
            "while the broker link is down, or not yet written when it went; events wait in the "
            "outbox instead) or queue_full.",
            ["reason"],
        )
        _touch(self.mqtt_publish_dropped_total, ("not_connected", "queue_full"))

    def _add_model(self) -> None:
        self.model_info = self._gauge(
            "oteo_model_info", "The model being served (always 1).", ["name", "version", "sha256"]
        )
        self.model_reloads_total = self._counter(
            "oteo_model_reloads_total", "Model reloads, by result.", ["result"]
        )
        _touch(self.model_reloads_total, RELOAD_RESULTS)
        self.build_info = self._gauge(
            "oteo_build_info", "The oteo version running (always 1).", ["version"]
        )
        self.build_info.labels(__version__).set(1)

    def _add_recorder(self) -> None:
        self.recorder_readings_total = self._counter(
            "oteo_recorder_readings_total", "Readings written to the recording store."
        )
        self.recorder_deleted_total = self._counter(
            "oteo_recorder_deleted_total",
            "Oldest readings deleted from the recording store, by reason (size or age).",
            ["reason"],
        )
        _touch(self.recorder_deleted_total, ("size", "age"))
        self.recorder_dropped_total = self._counter(
            "oteo_recorder_dropped_total",
            "Readings not recorded because the writer fell behind or failed.",
        )
        self.recorder_errors_total = self._counter(
            "oteo_recorder_errors_total",
            "Failed writes to the recording store (disk full, read-only, I/O).",
        )
        self.recorder_bytes = self._gauge(
            "oteo_recorder_bytes", "Bytes in use in the recording store."
        )
        self.similar_windows = self._gauge(
            "oteo_similar_windows", "Recorded windows whose hash bits can be searched (similar)."
        )
        self.similar_index_bytes = self._gauge(
            "oteo_similar_index_bytes", "Memory held by the index of those windows' hash bits."
        )
        self.alarm_starts_total = self._counter(
            "oteo_alarm_starts_total",
            "Alarm starts of recorded streams, by stream and whether an earlier episode hashed "
            "within [similar] max_distance of the start window (seen=before) or none (seen=new).",
            ["stream", "seen"],
        )
        self.alarms_suppressed_total = self._counter(
            "oteo_alarms_suppressed_total",
            "Alarms not announced because their start window hashed like an episode labelled "
            "false_alarm with a mute of similar episodes (mute_similar_s).",
        )
        self.event_labels = self._gauge(
            "oteo_event_labels", "Alarm episodes in the event journal with this label.", ["label"]
        )
        _touch(self.event_labels, LABELS)
        self.labels_total = self._counter(
            "oteo_labels_total",
            "Labels given to alarm episodes, by stream (capped like the stream series) and label.",
            ["stream", "label"],
        )

    def _add_ops(self) -> None:
        self.ops_total = self._counter(
            "oteo_ops_total", "Operation requests, by operation and result.", ["op", "result"]
        )
        self.ops_duration_seconds = self._histogram(
            "oteo_ops_duration_seconds", "Duration of an operation request.", OP_BUCKETS_S, ["op"]
        )
        for op in (*OPS, *get_args(MemoryOp)):
            self.ops_duration_seconds.labels(op)
            for result in OP_RESULTS:
                self.ops_total.labels(op, result)
        # Not pre-initialised: status codes are not a fixed set.
        self.http_requests_total = self._counter(
            "oteo_http_requests_total",
            "HTTP requests, by path (unknown paths as other) and status code.",
            ["path", "code"],
        )

    def _add_partitions(self) -> None:
        self.partition_owned = self._gauge(
            "oteo_partition_owned",
            "1 while this instance's session of a partition is connected, else 0.",
            ["partition"],
        )
        self.partition_readings_total = self._counter(
            "oteo_partition_readings_total",
            "Readings received on a partition's session.",
            ["partition"],
        )
        self.rescored_readings_total = self._counter(
            "oteo_rescored_readings_total",
            "Readings scored a second time after an unclean restart: taken by the dead run "
            "after its last checkpoint (as far as its heartbeat saw), redelivered, scored again.",
        )
        self.partition_sessions_lost_total = self._counter(
            "oteo_partition_sessions_lost_total",
            "Established partition sessions that were lost (a broker restart, the network, or "
            "another instance connecting with the same client id: two owners of a partition).",
            ["partition"],
        )
        self.partition_acks_held = self._gauge(
            "oteo_partition_acks_held",
            "Readings of a partition taken but not yet acknowledged (awaiting a checkpoint).",
            ["partition"],
        )
        self.checkpoints_total = self._counter(
            "oteo_checkpoints_total", "Partition checkpoints written to the state directory."
        )
        self.redelivered_duplicates_total = self._counter(
            "oteo_redelivered_duplicates_total",
            "Readings on partition sessions dropped as already seen (by seq, or by a timestamp "
            "at or before the stream's newest): redeliveries after a failover or a crash.",
        )
        self.redelivered_late_total = self._counter(
            "oteo_redelivered_late_total",
            "Readings on partition sessions never taken that arrived after newer ones of their "
            "stream (a redelivery after a crash came too late): dropped unscored. Above 0, raise "
            "[partitions] redelivery_wait_s.",
        )

    def stream_label(self, stream: str) -> str:
        """The label value for `stream`: its id for the first streams seen, then `_other`.

        A stream keeps its label for as long as it is tracked; a slot freed by
        `forget_stream` goes to the next new stream.
        """
        label = self._stream_labels.get(stream)
        if label is None:
            if self._own_labels < self.max_stream_labels and stream != OTHER:
                label = stream
                self._own_labels += 1
            else:
                label = OTHER
            self._stream_labels[stream] = label
        return label

    def forget_stream(self, stream: str) -> None:
        """Remove an evicted stream's own series (pooled `_other` series stay)."""
        label = self._stream_labels.pop(stream, None)
        if label is None or label == OTHER:
            return
        self._own_labels -= 1
        for series in (
            self.stream_score,
            self.stream_threshold,
            self.stream_anomalous,
            self.stream_readings_total,
            self.stream_windows_total,
        ):
            series.remove(label)

    def set_model(self, name: str, version: str, sha256: str) -> None:
        """Name the model being served, replacing the previous one's series."""
        self.model_info.clear()
        self.model_info.labels(name, version, sha256).set(1)


def _touch(metric: Counter | Gauge, values: Iterable[str]) -> None:
    for value in values:
        metric.labels(value)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
