"""The main loop's logic: readings -> windows -> micro-batched scores -> alarms -> messages.

One `Engine` owns all mutable stream state and is only ever called from the main loop thread.
It has no threads and no I/O of its own: messages leave through the `publish` callable (the
MQTT link's queue), which makes it testable with plain function calls.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from daemon import __version__
from daemon.alarm import Transition
from daemon.aligner import ChannelAligner
from daemon.config import Config, apply_alarm_overrides
from daemon.drift import DriftMeter
from daemon.manifest import AlarmPolicy
from daemon.messages import (
    ChannelContribution,
    Event,
    ModelRef,
    StateName,
    Status,
    StreamState,
    WindowScore,
    format_ts,
)
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.reading import ChannelSample, ParsedReading
from daemon.stream import Alarm, Stream, new_stream, top_contributions
from daemon.window import PushOutcome, PushResult

log = logging.getLogger(__name__)

# While an alarm lasts, an `update` event repeats its peak at most this often (data time).
EVENT_UPDATE_S = 60.0
TOP_CHANNELS = 3
# Consecutive late readings (at least a window's worth) after which a stream re-anchors.
LATE_RESET_MIN = 10


class Publish(Protocol):
    def __call__(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, durable: bool
    ) -> None: ...


@dataclass(slots=True)
class Work:
    """One validated message for the main loop: readings of a stream, or one channel sample."""

    stream: str
    readings: list[ParsedReading] | None
    channel: int = -1
    sample: ChannelSample | None = None
    arrival: float = 0.0  # monotonic time the network thread received it
    size: int = 1  # readings it holds (the ingest queue is bounded in readings)


@dataclass(frozen=True, slots=True)
class Topics:
    input_prefix: str
    output_prefix: str
    instance: str

    def event(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/event"

    def state(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/state"

    def score(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/score"

    @property
    def status(self) -> str:
        return f"{self.output_prefix}/status/{self.instance}"

    @property
    def ops(self) -> str:
        return f"{self.output_prefix}/ops/{self.instance}"


@dataclass(slots=True)
class _Pending:
    stream: Stream
    ts: float
    arrival: float


class Engine:
    """Stream state, scoring and alarms; see the module docstring."""

    def __init__(
        self,
        model: Model,
        cfg: Config,
        publish: Publish,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.publish = publish
        self.metrics = metrics
        self.clock = clock
        self.topics = Topics(cfg.topics.input_prefix, cfg.topics.output_prefix, cfg.instance)
        self.streams: dict[str, Stream] = {}
        self._pending: list[_Pending] = []
        self._pending_since = 0.0  # clock() when the first pending window was queued
        self._sensitivity: dict[str, float] = dict(cfg.alarm.sensitivity)
        self.windows_scored = 0
        # Drift: windows above the normal p99, counted here and folded into the meter by tick().
        self.drift = DriftMeter()
        self._drift_above = 0
        self._drift_counted = 0
        self.use_model(model)

    # -- model -------------------------------------------------------------------------------

    def use_model(self, model: Model) -> None:
        """Start using `model` (at start-up, or a hot reload between two batches)."""
        m = model.manifest
        old: Model | None = getattr(self, "model", None)
        if old is not None:
            # Windows already queued were cut for the old model: score them with it first, so
            # a swap loses no window and scores none twice.
            self.score_pending()
            # The new model has its own quantiles: the last hour against the old p99 says
            # nothing about it.
            self.drift.reset()
            self._drift_above, self._drift_counted = 0, self.windows_scored
        self.model = model
        self.policy: AlarmPolicy = apply_alarm_overrides(m.alarm, self.cfg.alarm)
        self.model_ref = ModelRef.of(m, model.sha256)
        self._channel_q99 = np.array([row[-1] for row in m.channel_score_quantiles.values])
        self._p99 = float(np.interp(0.99, m.score_quantiles.levels, m.score_quantiles.values))
        self._batch = np.empty((self.cfg.scoring.max_batch, m.window, len(m.channels)), np.float32)
        self.metrics.set_model(m.name, m.version, model.sha256)
        reshaped = old is not None and (
            old.window != model.window or old.manifest.channels != m.channels
        )
        for stream in self.streams.values():
            stream.tracker.policy = self.policy
            if reshaped or old is None:
                stream.buffer = self._new_buffer()
                stream.tracker.reset()
        if old is not None and reshaped:
            log.warning("new model has another window or channels: every stream warms up again")

    def _new_buffer(self) -> Any:
        s = new_stream(
            "",
            window=self.model.window,
            channels=self.model.channels,
            period_s=self.model.manifest.sample_period_s,
            policy=self.policy,
            sensitivity=1.0,
            max_gap_s=self.cfg.ingest.gap_s(self.model.manifest.sample_period_s),
            reorder_tolerance_s=self.cfg.ingest.reorder_s(self.model.manifest.sample_period_s),
            now=self.clock(),
        )
        return s.buffer

    # -- intake ------------------------------------------------------------------------------

    def handle(self, work: Work) -> None:
        """Feed one message's readings into its stream; ready windows wait in the batch."""
        stream = self._stream(work.stream)
        now = self.clock()
        if work.readings is not None:
            for reading in work.readings:
                self._push(stream, reading.ts, reading.values, reading.seq, work.arrival)
        elif work.sample is not None:
            if stream.aligner is None:
                period = self.model.manifest.sample_period_s
                stream.aligner = ChannelAligner(self.model.channels, period_s=period)
            ts = work.sample.ts if work.sample.ts is not None else time.time()
            rows = stream.aligner.push(work.channel, ts, work.sample.value)
            for row_ts, values in rows:
                self._push(stream, row_ts, values, None, work.arrival)
        stream.last_seen = now
        # A batch goes when it is full or its first window has waited `max_wait_s` (the main
        # loop also scores whenever the queue runs dry); under a steady stream the queue rarely
        # does, and windows would otherwise wait for a full batch.
        if self._pending and (
            len(self._pending) >= self.cfg.scoring.max_batch
            or now - self._pending_since >= self.cfg.scoring.max_wait_s
        ):
            self.score_pending()

    def _push(
        self, stream: Stream, ts: float, values: np.ndarray, seq: int | None, arrival: float
    ) -> None:
        self._account(stream, stream.buffer.push(ts, values, seq), ts, arrival)

    def _account(self, stream: Stream, out: PushOutcome, ts: float, arrival: float) -> None:
        m = self.metrics
        if out.result is PushResult.DUPLICATE:
            m.messages_total.labels(result="duplicate").inc()
            return
        if out.result is PushResult.LATE:
            m.messages_total.labels(result="late").inc()
            stream.late_run += 1
            if stream.late_run >= max(LATE_RESET_MIN, self.model.window):
                # A run of "late" readings means the stream's clock jumped back (or one bogus
                # reading from the future anchored it): start again from the readings we get.
                log.warning(
                    "stream %s: %d late readings in a row, restarting its window",
                    stream.id,
                    stream.late_run,
                )
                m.gap_resets_total.inc()
                self._interrupt(stream, ts, "clock jumped back")
                stream.buffer.reset()
                stream.late_run = 0
            return
        stream.late_run = 0
        m.readings_total.inc()
        if out.seq_gap:
            m.seq_gaps_total.inc(out.seq_gap)
        if out.filled:
            m.filled_samples_total.inc(out.filled)
        stream.last_ts = max(stream.last_ts, ts)
        if out.result is PushResult.GAP_RESET:
            m.gap_resets_total.inc()
            self._interrupt(stream, ts, "gap")
        # Oldest first: after a filled gap several windows are ready, and each is scored.
        for back in reversed(range(out.windows_ready)):
            if len(self._pending) >= self.cfg.scoring.max_batch:
                self.score_pending()
            if not self._pending:
                self._pending_since = self.clock()
            stream.buffer.take_at(back, out=self._batch[len(self._pending)])
            window_ts = ts - back * self.policy.hop * self.model.manifest.sample_period_s
            self._pending.append(_Pending(stream, window_ts, arrival))
        if not out.windows_ready and stream.state == "stale":
            self._set_state(stream, "warming_up", ts)

    def _stream(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        if len(self.streams) >= self.cfg.ingest.max_streams:
            self._evict()
        period = self.model.manifest.sample_period_s
        stream = new_stream(
            stream_id,
            window=self.model.window,
            channels=self.model.channels,
            period_s=period,
            policy=self.policy,
            sensitivity=self._sensitivity.get(stream_id, 1.0),
            max_gap_s=self.cfg.ingest.gap_s(period),
            reorder_tolerance_s=self.cfg.ingest.reorder_s(period),
            now=self.clock(),
        )
        self.streams[stream_id] = stream
        label = self.metrics.stream_label(stream_id)
        stream.score_metric = self.metrics.stream_score.labels(stream=label)
        self.metrics.stream_threshold.labels(stream=label).set(
            self.policy.enter_threshold / stream.tracker.sensitivity
        )
        self._publish_state(stream, time.time())
        return stream

    def _evict(self) -> None:
        oldest = min(self.streams.values(), key=lambda s: s.last_seen)
        log.warning("max_streams reached: evicting stream %s (least recently seen)", oldest.id)
        self._pending = [p for p in self._pending if p.stream is not oldest]
        del self.streams[oldest.id]
        # An empty retained message clears the stream's retained state on the broker.
        self.publish(self.topics.state(oldest.id), b"", qos=1, retain=True, durable=False)
        self.metrics.forget_stream(oldest.id)

    # -- scoring -----------------------------------------------------------------------------

    def score_pending(self) -> int:
        """Score every queued window in one onnxruntime call; returns how many."""
        n = len(self._pending)
        if n == 0:
            return 0
        t0 = time.perf_counter()
        out = self.model.run(self._batch[:n])
        self.metrics.inference_duration_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size_windows.observe(n)
        self.metrics.windows_scored_total.inc(n)
        self.windows_scored += n
        pending, self._pending = self._pending, []
        for i, item in enumerate(pending):
            self._on_score(
                item,
                float(out.score[i]),
                out.channel_score[i],
                self._batch[i, -1],
                out.reconstruction[i, -1],
            )
        return n

    def _on_score(
        self,
        item: _Pending,
        score: float,
        channel_score: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
    ) -> None:
        stream, ts = item.stream, item.ts
        if not math.isfinite(score):
            # Inputs are checked to be finite float32; a model can still overflow. Such a
            # window is counted and skipped so it cannot poison the stream's smoothing.
            self.metrics.messages_total.labels(result="non_finite").inc()
            log.warning("stream %s: non-finite score skipped", stream.id)
            return
        step = stream.tracker.update(score)
        stream.last_score = step.smoothed
        self._drift_above += score > self._p99
        stream.score_metric.set(step.smoothed)
        if self.cfg.topics.publish_scores:
            self._publish_score(stream, ts, step.smoothed, score, channel_score)
        muted = stream.muted_until > self.clock()
        alarm = stream.alarm
        # While muted the alarm logic keeps running; only its messages are held back, so a
        # fault that starts during a maintenance window is reported when the window closes.
        if step.transition is Transition.START:
            stream.alarm = Alarm.begin(ts, step.smoothed)
            if not muted:
                self._announce(stream, item, ts, step.smoothed, channel_score, observed, expected)
        elif step.transition is Transition.END and alarm is not None:
            if alarm.published:  # an announced alarm is always closed, muted or not
                self._event(stream, "end", ts, step.smoothed, channel_score, observed, expected)
                self._latency(item)
            stream.alarm = None
            if not muted:
                self._set_state(stream, "normal", ts)
        elif alarm is not None:
            alarm.peak = max(alarm.peak, step.smoothed)
            if not muted and not alarm.published:
                self._announce(stream, item, ts, step.smoothed, channel_score, observed, expected)
            elif not muted and ts - alarm.last_update_ts >= EVENT_UPDATE_S:
                alarm.last_update_ts = ts
                self._event(stream, "update", ts, step.smoothed, channel_score, observed, expected)
        elif not muted and stream.state != "normal":
            self._set_state(stream, "normal", ts)
        if muted and stream.state != "muted":
            self._set_state(stream, "muted", ts)

    def _announce(
        self,
        stream: Stream,
        item: _Pending,
        ts: float,
        score: float,
        channel_score: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
    ) -> None:
        assert stream.alarm is not None
        stream.alarm.published = True
        stream.alarm.last_update_ts = ts
        self._event(stream, "start", ts, score, channel_score, observed, expected)
        self._latency(item)
        self._set_state(stream, "anomalous", ts)

    def _latency(self, item: _Pending) -> None:
        if item.arrival > 0:
            self.metrics.event_latency_seconds.observe(max(0.0, self.clock() - item.arrival))

    # -- messages ----------------------------------------------------------------------------

    def _event(
        self,
        stream: Stream,
        kind: str,
        ts: float,
        score: float,
        channel_score: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
    ) -> None:
        alarm = stream.alarm
        assert alarm is not None
        alarm.peak = max(alarm.peak, score)
        names = self.model.manifest.channels
        top = [
            ChannelContribution(
                channel=names[c],
                contribution=share,
                score=normalised,
                observed=float(observed[c]),
                expected=float(expected[c]),
                direction="high" if observed[c] >= expected[c] else "low",
            )
            for c, share, normalised in top_contributions(
                channel_score, self._channel_q99, TOP_CHANNELS
            )
            if normalised > 0
        ]
        event = Event(
            event_id=alarm.event_id,
            kind=kind,
            stream=stream.id,
            instance=self.cfg.instance,
            ts=format_ts(ts),
            started=format_ts(alarm.started_ts),
            ended=format_ts(ts) if kind == "end" else None,
            score=max(0.0, score),
            peak_score=max(0.0, alarm.peak),
            threshold=self.policy.enter_threshold / stream.tracker.sensitivity,
            p_value=self.model.manifest.score_quantiles.p_value(score),
            top_channels=top,
            model=self.model_ref,
        )
        self.publish(
            self.topics.event(stream.id),
            event.to_json(),
            qos=self.cfg.mqtt.qos,
            retain=False,
            durable=True,
        )
        self.metrics.events_total.labels(kind=kind).inc()

    def _publish_score(
        self, stream: Stream, ts: float, smoothed: float, score: float, channel_score: np.ndarray
    ) -> None:
        msg = WindowScore(
            stream=stream.id,
            ts=format_ts(ts),
            score=max(0.0, smoothed),
            threshold=self.policy.enter_threshold / stream.tracker.sensitivity,
            p_value=self.model.manifest.score_quantiles.p_value(score),
            channel_scores={
                name: float(v)
                for name, v in zip(self.model.manifest.channels, channel_score, strict=True)
            },
        )
        self.publish(
            self.topics.score(stream.id), msg.to_json(), qos=0, retain=False, durable=False
        )

    def _set_state(self, stream: Stream, state: StateName, ts: float) -> None:
        if stream.state == state:
            return
        stream.state = state
        stream.state_since_ts = ts
        label = self.metrics.stream_label(stream.id)
        self.metrics.stream_anomalous.labels(stream=label).set(1 if state == "anomalous" else 0)
        self._publish_state(stream, ts)

    def _publish_state(self, stream: Stream, ts: float) -> None:
        msg = StreamState(
            stream=stream.id,
            state=stream.state,
            ts=format_ts(ts),
            score=None if stream.last_score is None else max(0.0, stream.last_score),
            threshold=self.policy.enter_threshold / stream.tracker.sensitivity,
            event_id=stream.alarm.event_id if stream.alarm else None,
            since=format_ts(stream.state_since_ts or ts),
        )
        self.publish(self.topics.state(stream.id), msg.to_json(), qos=1, retain=True, durable=False)

    def status(self, state: str) -> bytes:
        """The retained status payload (online, or offline for the last will)."""
        return Status(
            instance=self.cfg.instance,
            state=state,
            ts=format_ts(time.time()),
            version=__version__,
            model=self.model_ref,
        ).to_json()

    def republish_states(self) -> None:
        """After a reconnect: retained states again (a non-durable publish may have been lost)."""
        for stream in self.streams.values():
            self._publish_state(stream, stream.last_ts or time.time())

    # -- time --------------------------------------------------------------------------------

    def _interrupt(self, stream: Stream, ts: float, why: str) -> None:
        """The stream's data broke off (gap or silence): end its alarm; it warms up again."""
        stream.tracker.reset()
        if stream.alarm is not None:
            log.info("stream %s: alarm %s ends (%s)", stream.id, stream.alarm.event_id, why)
            if stream.alarm.published:
                # No window to blame: the end carries no channel contributions.
                zeros = np.zeros(self.model.channels)
                self._event(stream, "end", ts, stream.last_score or 0.0, zeros, zeros, zeros)
            stream.alarm = None

    def tick(self) -> None:
        """Periodic work: staleness, aligner flushes, gauges. Call about once a second."""
        now = self.clock()
        stale_s = self.cfg.ingest.stale_s(self.model.manifest.sample_period_s)
        wall = time.time()
        for stream in self.streams.values():
            silent_s = now - stream.last_seen
            # Device time now, estimated from the stream's own clock (not this host's).
            device_now = stream.last_ts + silent_s
            if stream.aligner is not None:
                for row_ts, values in stream.aligner.flush(device_now):
                    self._push(stream, row_ts, values, None, 0.0)
            if silent_s > self.cfg.ingest.reorder_tolerance_s:
                for out in stream.buffer.drain():
                    # Held readings were counted when they arrived; only their windows remain.
                    if out.windows_ready:
                        self._account(stream, _windows_only(out), stream.last_ts, 0.0)
            if stream.state != "stale" and now - stream.last_seen > stale_s:
                self._interrupt(stream, stream.last_ts, "stale")
                stream.buffer.reset(keep_seq=True)
                self._set_state(stream, "stale", stream.last_ts or wall)
            elif stream.state == "muted" and stream.muted_until <= now:
                self._end_mute(stream, wall)
        counts = dict.fromkeys(("normal", "anomalous", "stale", "warming_up", "muted"), 0)
        for stream in self.streams.values():
            counts[stream.state] += 1
        for state, count in counts.items():
            self.metrics.streams.labels(state=state).set(count)
        self.metrics.alarms_active.set(sum(1 for s in self.streams.values() if s.alarm))
        self.drift.add(now, self.windows_scored - self._drift_counted, self._drift_above)
        self._drift_above, self._drift_counted = 0, self.windows_scored
        self.metrics.drift_windows_above_p99_ratio.set(self.drift.ratio(now))

    # -- operator controls -------------------------------------------------------------------

    def mute(self, stream_id: str, duration_s: float) -> Stream:
        stream = self._stream(stream_id)
        stream.muted_until = self.clock() + duration_s
        self._set_state(stream, "muted", time.time())
        return stream

    def unmute(self, stream_id: str) -> Stream:
        stream = self._stream(stream_id)
        stream.muted_until = 0.0
        self._end_mute(stream, time.time())
        return stream

    def _end_mute(self, stream: Stream, ts: float) -> None:
        """Back to the alarm state the logic is in; an alarm raised while muted is announced
        with the next scored window (it carries that window's channels)."""
        announced = stream.alarm is not None and stream.alarm.published
        self._set_state(stream, "anomalous" if announced else "normal", ts)

    def set_sensitivity(self, stream_id: str, factor: float) -> Stream:
        self._sensitivity[stream_id] = factor
        stream = self._stream(stream_id)
        stream.tracker.sensitivity = factor
        label = self.metrics.stream_label(stream_id)
        self.metrics.stream_threshold.labels(stream=label).set(self.policy.enter_threshold / factor)
        return stream

    def describe(self) -> list[dict[str, Any]]:
        """A snapshot of every stream for /v1/streams."""
        return [
            {
                "stream": s.id,
                "state": s.state,
                "score": s.last_score,
                "threshold": self.policy.enter_threshold / s.tracker.sensitivity,
                "sensitivity": s.tracker.sensitivity,
                "event_id": s.alarm.event_id if s.alarm else None,
                "last_ts": format_ts(s.last_ts) if s.last_ts else None,
            }
            for s in self.streams.values()
        ]


def _windows_only(out: PushOutcome) -> PushOutcome:
    """A drained outcome with its counts cleared (the reading was counted on arrival)."""
    return PushOutcome(PushResult.ACCEPTED, out.windows_ready, 0, 0)
