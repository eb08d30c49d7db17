"""The main loop's logic: readings -> windows -> micro-batched scores -> alarms -> outputs.

One `Engine` owns all mutable stream state and is only ever called from the main loop thread.
It has no threads and no I/O of its own: what it decides (events, state changes, window scores,
an evicted stream) goes to the `sink` as domain objects (`daemon.publisher.Output`), which the
daemon maps to MQTT and tests collect in a list. The model is anything with the `Scorer` shape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.aligner import ChannelAligner
from daemon.batch import Pending, WindowBatch
from daemon.config import Config, apply_alarm_overrides
from daemon.detector import Detector, Stages
from daemon.drift import DriftMeter
from daemon.episode import Episodes, Serving
from daemon.intake import Work
from daemon.memory import StreamMemory
from daemon.messages import STATES
from daemon.metrics import Metrics
from daemon.model import Scorer
from daemon.publisher import Output, StreamGone
from daemon.stream import Stream, new_buffer
from daemon.throttle import Throttle
from daemon.window import PushOutcome, PushResult, StreamBuffer

log = logging.getLogger(__name__)

# Consecutive late readings (at least a window's worth) after which a stream re-anchors.
LATE_RESET_MIN = 10


class Engine:
    """Stream state, scoring and alarms; see the module docstring."""

    def __init__(
        self,
        model: Scorer,
        cfg: Config,
        sink: Callable[[Output], None],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.streams: dict[str, Stream] = {}
        self.episodes = Episodes(
            sink,
            metrics,
            instance=cfg.instance,
            publish_scores=cfg.topics.publish_scores,
            alarm_log_every_s=cfg.log.alarm_every_s,
            clock=clock,
        )
        self._sensitivity: dict[str, float] = dict(cfg.alarm.sensitivity)
        self.windows_scored = 0
        # Drift: windows above the normal p99, counted here and folded into the meter by tick().
        self.drift = DriftMeter()
        self._drift_above = 0
        self._drift_counted = 0
        self._dropped = metrics.messages_total.labels(result="model_changed")
        self._late_log = Throttle()
        self.serving: Serving | None = None
        self.memory: StreamMemory | None = None  # streams' saved states (the daemon sets it)
        # What makes windows of two models incompatible: window, channels, hop, sample period.
        self._shape: tuple[object, ...] = ()
        self.use_model(model)

    # -- model -------------------------------------------------------------------------------

    @property
    def model(self) -> Scorer:
        assert self.serving is not None
        return self.serving.scorer

    def use_model(self, model: Scorer) -> None:
        """Start using `model` (at start-up, or a hot reload between two batches).

        Raises ConfigError (before changing anything) if the config's alarm overrides do not
        fit the model's own policy.
        """
        m = model.manifest
        policy = apply_alarm_overrides(m.alarm, self.cfg.alarm)
        self._stages = Stages.of(m).overridden(self.cfg.alarm)
        old = self.serving
        if old is not None:
            # Windows already queued were cut for the old model: score them with it first, so
            # a swap loses no window and scores none twice.
            self.score_pending()
            # The new model has its own quantiles: the last hour against the old p99 says
            # nothing about it.
            self.drift.reset()
            self._drift_above, self._drift_counted = 0, self.windows_scored
        shape = (m.window, tuple(m.channels), policy.hop, m.sample_period_s)
        reshaped = old is not None and shape != self._shape
        if reshaped:
            # Their windows do not fit the new model: every stream starts again, and an alarm
            # it was in ends now, named by the model that raised it (not silently).
            for stream in self.streams.values():
                self.episodes.interrupt(stream, stream.last_ts, "model changed")
        self._shape = shape
        self.serving = self.episodes.serving = Serving.of(model, policy)
        self.episodes.publish_scores = self.cfg.topics.publish_scores
        self._channels = tuple(m.channels)
        self._batch = WindowBatch(
            self.cfg.scoring.max_batch, m.window, len(m.channels), self.metrics, self.clock
        )
        self.metrics.set_model(m.name, m.version, model.sha256)
        for stream in self.streams.values():
            previous, stream.detector = stream.detector, self._new_detector(stream.id)
            if reshaped:
                stream.buffer = self._new_buffer()
                stream.aligner = None  # built again for the new channels on the next value
                stream.late_run = 0
            else:
                stream.detector.follow(previous)  # an alarm across the swap ends properly
        if reshaped:
            log.warning(
                "new model has another window, channels, hop or sample period: "
                "every stream warms up again"
            )
        if self.memory is not None:
            self.memory.use_model(model.sha256)
        if self.episodes.recall is not None:
            self.episodes.recall.use_model(m, model.sha256)

    def _new_detector(self, stream_id: str) -> Detector:
        assert self.serving is not None
        sensitivity = self._sensitivity.get(stream_id, 1.0)
        return Detector(self._stages, self.serving.policy, sensitivity)

    def _new_buffer(self) -> StreamBuffer:
        assert self.serving is not None
        m, policy = self.model.manifest, self.serving.policy
        period = m.sample_period_s
        return new_buffer(
            window=m.window,
            channels=len(m.channels),
            period_s=period,
            hop=policy.hop,
            max_gap_s=self.cfg.ingest.gap_s(period),
            reorder_s=self.cfg.ingest.reorder_s(period),
        )

    # -- intake ------------------------------------------------------------------------------

    def handle(self, work: Work) -> bool:
        """Feed one message's readings into its stream (ready windows wait in the batch);
        False if the message was parsed for a model with other channels (dropped, counted)."""
        channels = work.layout.channels
        if channels is not self._channels and channels != self._channels:
            # Queued before a reload: its values do not fit this model's windows.
            self._dropped.inc(work.size)
            return False
        stream = self._stream(work.stream)
        stream.partition = work.partition
        now = self.clock()
        if work.readings is not None:
            for reading in work.readings:
                self._push(stream, reading.ts, reading.values, reading.seq, work.arrival)
        elif work.sample is not None:
            self._push_sample(stream, work)
        stream.last_seen = now
        # A batch goes when it is full or its first window has waited `max_wait_s` (the main
        # loop also scores whenever the queue runs dry); under a steady stream the queue rarely
        # does, and windows would otherwise wait for a full batch.
        if self._batch.due(now, self.cfg.scoring):
            self.score_pending()
        return True

    def _push_sample(self, stream: Stream, work: Work) -> None:
        """One channel's value: aligned onto the grid first; dropped values are counted."""
        assert work.sample is not None
        aligner = stream.aligner
        if aligner is None:
            aligner = stream.aligner = self._new_aligner()
        late, duplicates = aligner.late, aligner.duplicates
        ts = work.sample.ts if work.sample.ts is not None else time.time()
        for row_ts, values in aligner.push(work.channel, ts, work.sample.value):
            self._push(stream, row_ts, values, None, work.arrival)
        if aligner.late != late:
            self.metrics.messages_total.labels(result="late").inc()
        elif aligner.duplicates != duplicates:
            self.metrics.messages_total.labels(result="duplicate").inc()

    def _new_aligner(self) -> ChannelAligner:
        return ChannelAligner(len(self._channels), period_s=self.model.manifest.sample_period_s)

    def _push(
        self, stream: Stream, ts: float, values: np.ndarray, seq: int | None, arrival: float
    ) -> None:
        self._account(stream, stream.buffer.push(ts, values, seq), ts, arrival)

    def _account(self, stream: Stream, out: PushOutcome, ts: float, arrival: float) -> None:
        m = self.metrics
        if out.result is PushResult.DUPLICATE:
            m.messages_total.labels(result="duplicate").inc()
            if stream.partition >= 0:
                m.redelivered_duplicates_total.inc()
            return
        if out.result is PushResult.LATE:
            if out.missed:
                # Never taken, and newer readings of its stream came first (not a clock that
                # jumped back). On a partition: the broker redelivered it after them, a
                # failover whose wait was too short. Lost.
                m.messages_total.labels(result="late").inc()
                if stream.partition < 0:
                    return
                m.redelivered_late_total.inc()
                if self._late_log.ready():
                    log.warning(
                        "stream %s: a reading redelivered after newer ones was dropped unscored "
                        "(oteo_redelivered_late_total); raise [partitions] redelivery_wait_s",
                        stream.id,
                    )
                return
            if stream.partition >= 0 and ts <= stream.last_ts:
                # A partition's broker redelivers what a crashed owner never acknowledged;
                # beyond the window's ring it is taken as seen already.
                m.messages_total.labels(result="duplicate").inc()
                m.redelivered_duplicates_total.inc()
                return
            m.messages_total.labels(result="late").inc()
            self._late(stream, ts)
            return
        stream.late_run = 0
        m.readings_total.inc()
        stream.readings_metric.inc()
        if ts <= stream.rescore_until_ts:
            m.rescored_readings_total.inc()
        if out.seq_gap:
            m.seq_gaps_total.inc(out.seq_gap)
        if out.filled:
            m.filled_samples_total.inc(out.filled)
        stream.last_ts = max(stream.last_ts, ts)
        if out.result is PushResult.GAP_RESET:
            m.gap_resets_total.inc()
            self.episodes.interrupt(stream, ts, "gap")
        # Oldest first: after a filled gap several windows are ready, and each is scored.
        hop_s = self.serving.policy.hop * self.model.manifest.sample_period_s  # type: ignore[union-attr]
        for back in reversed(range(out.windows_ready)):
            if len(self._batch) >= self.cfg.scoring.max_batch:
                self.score_pending()
            self._batch.add(stream.buffer, back, Pending(stream, ts - back * hop_s, arrival))
        if not out.windows_ready and stream.state == "stale":
            self.episodes.set_state(stream, "warming_up", ts)

    def _late(self, stream: Stream, ts: float) -> None:
        stream.late_run += 1
        if stream.late_run >= max(LATE_RESET_MIN, self.model.window):
            # A run of "late" readings means the stream's clock jumped back (or one bogus
            # reading from the future anchored it): start again from the readings we get.
            log.warning(
                "stream %s: %d late readings in a row, restarting its window",
                stream.id,
                stream.late_run,
            )
            self.metrics.gap_resets_total.inc()
            self.episodes.interrupt(stream, ts, "clock jumped back")
            stream.buffer.reset()
            stream.late_run = 0

    def adopt(self, stream_id: str) -> Stream:
        """The stream, created (as on its first reading) if it is not tracked yet."""
        return self._stream(stream_id)

    def _stream(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        if len(self.streams) >= self.cfg.ingest.max_streams:
            self._evict()
        detector = self._new_detector(stream_id)
        stream = Stream(stream_id, self._new_buffer(), detector, last_seen=self.clock())
        self.streams[stream_id] = stream
        label = self.metrics.stream_label(stream_id)
        stream.score_metric = self.metrics.stream_score.labels(stream=label)
        stream.threshold_metric = self.metrics.stream_threshold.labels(stream=label)
        stream.readings_metric = self.metrics.stream_readings_total.labels(stream=label)
        stream.windows_metric = self.metrics.stream_windows_total.labels(stream=label)
        stream.threshold_metric.set(detector.threshold)
        if self.memory is not None:
            self.memory.revive(stream)  # what it had learnt before a restart
        self.sink(self.episodes.state_message(stream, time.time()))
        return stream

    def _evict(self) -> None:
        oldest = min(self.streams.values(), key=lambda s: s.last_seen)
        log.warning("max_streams reached: evicting stream %s (least recently seen)", oldest.id)
        self._batch.forget(oldest)
        del self.streams[oldest.id]
        self.sink(StreamGone(oldest.id))
        self.metrics.forget_stream(oldest.id)
        self.episodes.forget(oldest.id)

    # -- scoring -----------------------------------------------------------------------------

    def score_pending(self) -> int:
        """Score every queued window in one onnxruntime call; returns how many."""
        if not self._batch.items:
            return 0
        pending, windows, out = self._batch.run(self.model)
        n = len(pending)
        self.windows_scored += n
        p99 = self.serving.p99  # type: ignore[union-attr]
        # Hash bits and signatures only for batches with a remembered (recorded) stream.
        recall = self.episodes.recall
        kept = [recall.remembers(p.stream.id) for p in pending] if recall is not None else []
        words = sigs = None
        if recall is not None and any(kept):
            words = recall.words(out.code)
            sigs = recall.signatures(windows, out.reconstruction, out.channel_score)
        for i, item in enumerate(pending):
            score = float(out.score[i])
            if not math.isfinite(score):
                # Inputs are checked to be finite float32; a model can still overflow. Such a
                # window is counted and skipped so it cannot poison the stream's smoothing.
                self.metrics.messages_total.labels(result="non_finite").inc()
                log.warning("stream %s: non-finite score skipped", item.stream.id)
                continue
            self._drift_above += score > p99
            item.stream.windows_metric.inc()
            self.episodes.on_score(
                item.stream,
                item.ts,
                item.arrival,
                score,
                out.channel_score[i],
                windows[i, -1],
                out.reconstruction[i, -1],
                int(words[i]) if words is not None and kept[i] else None,
                int(sigs[i]) if sigs is not None and kept[i] else None,
            )
        return n

    # -- time --------------------------------------------------------------------------------

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
                        self._account(stream, out.windows_only(), stream.last_ts, 0.0)
            if stream.state != "stale" and silent_s > stale_s:
                # The alarm ends, but the window stays: readings that resume on the same grid
                # (a partition's backlog after a failover, a link that was cut) carry on from
                # it; only a real gap in their timestamps (> max_gap_s) restarts it.
                self.episodes.interrupt(stream, stream.last_ts, "stale")
                self.episodes.set_state(stream, "stale", stream.last_ts or wall)
            elif stream.state == "muted" and stream.muted_until <= now:
                self.episodes.end_mute(stream, wall)
        self._update_gauges(now)

    def _update_gauges(self, now: float) -> None:
        counts = dict.fromkeys(STATES, 0)
        for stream in self.streams.values():
            counts[stream.state] += 1
        for state, count in counts.items():
            self.metrics.streams.labels(state=state).set(count)
        self.metrics.alarms_active.set(sum(1 for s in self.streams.values() if s.alarm))
        self.drift.add(now, self.windows_scored - self._drift_counted, self._drift_above)
        self._drift_above, self._drift_counted = 0, self.windows_scored
        self.metrics.drift_windows_above_p99_ratio.set(self.drift.ratio(now))

    def set_sensitivity(self, stream: Stream, factor: float) -> None:
        """Divide a stream's thresholds by `factor` (kept if the stream is evicted and returns)."""
        self._sensitivity[stream.id] = factor
        stream.detector.sensitivity = factor
        stream.threshold_metric.set(stream.detector.threshold)

    def states(self) -> list[Any]:
        """The current state message of every stream (re-sent after a reconnect)."""
        return [
            self.episodes.state_message(s, s.last_ts or time.time()) for s in self.streams.values()
        ]
