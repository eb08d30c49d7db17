"""What a scored window means for its stream: alarm events and state changes (domain outputs).

`Episodes` feeds one window's scores into the stream's detector and turns the outcome into
outputs for the sink: a `start` event when an alarm begins, `update`s while it lasts (at most once
a minute of data time), an `end` when it is over, and the stream's state (normal, anomalous,
muted ...). Every event of one alarm carries the same event id and the channels behind the
alarm's peak window, so the end still names the cause rather than the last, already normal
window. Nothing here knows about MQTT.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from daemon.alarm import Transition
from daemon.detector import Decision
from daemon.journal import Journal
from daemon.manifest import AlarmPolicy
from daemon.messages import (
    LABELS,
    ChannelContribution,
    EndReason,
    Event,
    EventKind,
    ModelRef,
    StateName,
    StreamState,
    WindowScore,
    format_ts,
)
from daemon.metrics import Metrics
from daemon.model import Scorer
from daemon.publisher import Output
from daemon.quantiles import Quantiles
from daemon.recall import Recall
from daemon.stream import Alarm, Peak, Stream, top_contributions

log = logging.getLogger(__name__)

# While an alarm lasts, an `update` event repeats its peak at most this often (data time).
EVENT_UPDATE_S = 60.0
TOP_CHANNELS = 3


@dataclass(frozen=True)
class Serving:
    """The model being served, and what the engine derives from it once per model."""

    scorer: Scorer
    policy: AlarmPolicy
    ref: ModelRef
    channel_q99: np.ndarray  # per channel: its normal p99, to normalise contributions
    p99: float  # the normal p99 of window scores (drift)
    p_values: Quantiles  # of the detector's score on normal data (event p-values)

    @classmethod
    def of(cls, scorer: Scorer, policy: AlarmPolicy) -> Serving:
        m = scorer.manifest
        q99 = np.array([row[-1] for row in m.channel_score_quantiles.values])
        p99 = float(np.interp(0.99, m.score_quantiles.levels, m.score_quantiles.values))
        detection = m.detection.score_quantiles if m.detection is not None else None
        ref = ModelRef.of(m, scorer.sha256)
        return cls(scorer, policy, ref, q99, p99, detection or m.score_quantiles)


class Episodes:
    """Alarm episodes of every stream; see the module docstring."""

    def __init__(
        self,
        sink: Callable[[Output], None],
        metrics: Metrics,
        *,
        instance: str,
        publish_scores: bool,
        alarm_log_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.alarm_log_every_s = alarm_log_every_s
        self.metrics = metrics
        self.instance = instance
        self.publish_scores = publish_scores
        self.clock = clock
        self.serving: Serving | None = None
        self.recall: Recall | None = None
        self.journal: Journal | None = None
        self._logged: dict[str, tuple[float, int, bool]] = {}  # stream: last, suppressed, open
        self._events = {k: metrics.events_total.labels(kind=k) for k in ("start", "update", "end")}

    def on_score(
        self,
        stream: Stream,
        ts: float,
        arrival: float,
        score: float,
        channel_score: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
        word: int | None = None,
        sig: int | None = None,
    ) -> None:
        """One scored window of `stream`; the arrays are views of a batch (copied if kept).

        `word`, `sig`: the window's hash bits and residual signature, for streams the recall
        remembers."""
        decision = stream.detector.update(score, channel_score)
        s = stream.last_score = decision.score
        stream.score_metric.set(s)
        if decision.threshold != stream.last_threshold:
            stream.last_threshold = decision.threshold
            stream.threshold_metric.set(decision.threshold)
        if self.publish_scores:
            self.sink(self._window_score(stream, ts, decision, score, channel_score))
        muted = stream.muted_until > self.clock()
        alarm = stream.alarm
        # While muted the alarm logic keeps running; only its messages are held back, so a
        # fault that starts during a maintenance window is reported when the window closes.
        if decision.transition is Transition.START:
            peak = _peak(s, ts, channel_score, observed, expected, word, sig)
            self._begin(stream, peak, arrival, muted)
        elif decision.transition is Transition.END and alarm is not None:
            if alarm.published:  # an announced alarm is always closed, muted or not
                reason: EndReason = "new_normal" if decision.new_normal else "cleared"
                self._event(stream, "end", ts, s, reason)
                self._latency(arrival)
            stream.alarm = None
            if not muted:
                self.set_state(stream, "normal", ts)
        elif alarm is not None:
            if s > alarm.peak.score:
                alarm.observe(_peak(s, ts, channel_score, observed, expected, word, sig))
            held = muted or alarm.suppressed_by is not None
            if not held and not alarm.published:
                self._announce(stream, ts, s, arrival)
            elif not held and ts - alarm.last_update_ts >= EVENT_UPDATE_S:
                alarm.last_update_ts = ts
                self._event(stream, "update", ts, s)
        elif not muted and stream.state != "normal":
            self.set_state(stream, "normal", ts)
        suppressed = stream.alarm is not None and stream.alarm.suppressed_by is not None
        if (muted or suppressed) and stream.state != "muted":
            self.set_state(stream, "muted", ts)
        if word is not None and self.recall is not None:
            # A suppressed alarm's windows are remembered as normal: the operator said so.
            alarm = stream.alarm
            event_id = alarm.event_id if alarm is not None and not suppressed else None
            self.recall.observe(stream.id, ts, s, event_id, word, sig)

    def _begin(self, stream: Stream, peak: Peak, arrival: float, muted: bool) -> None:
        """An alarm starts: is it like earlier ones (and one labelled a false alarm with a mute
        of similar episodes)? Announce it unless the stream is muted or it is suppressed."""
        alarm = stream.alarm = Alarm.begin(peak)
        if peak.sig is not None and self.recall is not None:
            alarm.seen_before = self.recall.seen_before(peak.sig, alarm.event_id, stream.id)
            alarm.suppressed_by = self.recall.suppressing(peak.sig, alarm.event_id)
            if alarm.suppressed_by is not None:
                self.metrics.alarms_suppressed_total.inc()
                log.info(
                    "stream %s: alarm %s not announced: it hashes like %s, labelled false_alarm "
                    "with a mute of similar episodes",
                    stream.id,
                    alarm.event_id,
                    alarm.suppressed_by,
                )
        if not muted and alarm.suppressed_by is None:
            self._announce(stream, peak.ts, peak.score, arrival)

    def interrupt(self, stream: Stream, ts: float, why: str) -> None:
        """The stream's data broke off (gap or silence): end its alarm; it warms up again."""
        stream.detector.reset()
        if stream.alarm is not None:
            log.info("stream %s: alarm %s ends (%s)", stream.id, stream.alarm.event_id, why)
            if stream.alarm.published:
                self._event(stream, "end", ts, stream.last_score or 0.0, "interrupted")
            stream.alarm = None

    def end_mute(self, stream: Stream, ts: float) -> None:
        """Back to the alarm state the logic is in; an alarm raised while muted is announced
        with the next scored window."""
        announced = stream.alarm is not None and stream.alarm.published
        self.set_state(stream, "anomalous" if announced else "normal", ts)

    def set_state(self, stream: Stream, state: StateName, ts: float) -> None:
        if stream.state == state:
            return
        stream.state = state
        stream.state_since_ts = ts
        label = self.metrics.stream_label(stream.id)
        self.metrics.stream_anomalous.labels(stream=label).set(1 if state == "anomalous" else 0)
        self.sink(self.state_message(stream, ts))

    def state_message(self, stream: Stream, ts: float) -> StreamState:
        return StreamState(
            stream=stream.id,
            state=stream.state,
            ts=format_ts(ts),
            score=None if stream.last_score is None else max(0.0, stream.last_score),
            threshold=stream.detector.threshold,
            event_id=stream.alarm.event_id if stream.alarm else None,
            since=format_ts(stream.state_since_ts or ts),
        )

    def forget(self, stream_id: str) -> None:
        """An evicted stream: drop what is kept for its log lines."""
        self._logged.pop(stream_id, None)

    # -- events ------------------------------------------------------------------------------

    def _announce(self, stream: Stream, ts: float, score: float, arrival: float) -> None:
        assert stream.alarm is not None
        stream.alarm.published = True
        stream.alarm.last_update_ts = ts
        self._event(stream, "start", ts, score)
        self._latency(arrival)
        self.set_state(stream, "anomalous", ts)

    def _latency(self, arrival: float) -> None:
        if arrival > 0:
            self.metrics.event_latency_seconds.observe(max(0.0, self.clock() - arrival))

    def _event(
        self,
        stream: Stream,
        kind: EventKind,
        ts: float,
        score: float,
        reason: EndReason | None = None,
    ) -> None:
        alarm, serving = stream.alarm, self.serving
        assert alarm is not None and serving is not None
        top = self._contributions(alarm.peak, serving)
        ended = kind == "end"
        event = Event(
            event_id=alarm.event_id,
            kind=kind,
            stream=stream.id,
            instance=self.instance,
            ts=format_ts(ts),
            started=format_ts(alarm.started_ts),
            ended=format_ts(ts) if ended else None,
            duration_s=max(0.0, ts - alarm.started_ts) if ended else None,
            reason=reason,
            score=max(0.0, score),
            peak_score=max(0.0, alarm.peak.score),
            threshold=stream.detector.threshold,
            threshold_source=stream.detector.threshold_source,
            p_value=serving.p_values.p_value(score),
            top_channels=top,
            model=serving.ref,
            seen_before=alarm.seen_before if kind == "start" else None,
        )
        self.sink(event)
        if kind == "start":
            # Its label series exist at 0 from now on: a label's increase() is then visible.
            label = self.metrics.stream_label(stream.id)
            for name in LABELS:
                self.metrics.labels_total.labels(label, name)
        if self.journal is not None and kind != "update":
            try:
                self.journal.record(
                    event,
                    start_word=alarm.start_word,
                    peak_word=alarm.peak.word,
                    start_sig=alarm.start_sig,
                    peak_sig=alarm.peak.sig,
                )
            except sqlite3.Error as exc:  # the event is out; only its journal entry is lost
                self.metrics.errors_total.labels(stage="journal").inc()
                log.error("event journal: cannot write %s: %s", event.event_id, exc)
        self._events[kind].inc()
        if kind != "update":
            self._log(stream, event)

    def _contributions(self, peak: Peak, serving: Serving) -> list[ChannelContribution]:
        names = serving.scorer.manifest.channels
        return [
            ChannelContribution(
                channel=names[c],
                contribution=share,
                score=normalised,
                observed=float(peak.observed[c]),
                expected=float(peak.expected[c]),
                direction="high" if peak.observed[c] >= peak.expected[c] else "low",
            )
            for c, share, normalised in top_contributions(
                peak.channel_score, serving.channel_q99, TOP_CHANNELS
            )
            if normalised > 0
        ]

    def _window_score(
        self,
        stream: Stream,
        ts: float,
        decision: Decision,
        score: float,
        channel_score: np.ndarray,
    ) -> WindowScore:
        serving = self.serving
        assert serving is not None
        manifest = serving.scorer.manifest
        return WindowScore(
            stream=stream.id,
            ts=format_ts(ts),
            score=max(0.0, decision.score),
            threshold=decision.threshold,
            p_value=serving.p_values.p_value(decision.score),
            channel_scores={
                name: float(v) for name, v in zip(manifest.channels, channel_score, strict=True)
            },
        )

    def _log(self, stream: Stream, event: Event) -> None:
        """Alarm start and end at INFO, at most one start (and its end) per stream a minute."""
        now = self.clock()
        last, suppressed, open_ = self._logged.get(stream.id, (-math.inf, 0, False))
        if event.kind == "start":
            if now - last < self.alarm_log_every_s:
                self._logged[stream.id] = (last, suppressed + 1, False)
                return
            more = f" ({suppressed} alarm starts not logged)" if suppressed else ""
            log.info(
                "stream %s: alarm %s started, score %.3g / threshold %.3g; %s%s",
                stream.id,
                event.event_id,
                event.score,
                event.threshold,
                _top_text(event),
                more,
            )
            self._logged[stream.id] = (now, 0, True)
        elif event.reason == "new_normal":
            # Always logged: the stream's normal has changed, a decision someone may question.
            log.info(
                "stream %s: new normal accepted after %.0f min in alarm %s (peak %.3g; %s)",
                stream.id,
                (event.duration_s or 0.0) / 60,
                event.event_id,
                event.peak_score,
                _top_text(event),
            )
            self._logged[stream.id] = (last, suppressed, False)
        elif open_:
            log.info(
                "stream %s: alarm %s ended (%s) after %.0f s, peak %.3g; %s",
                stream.id,
                event.event_id,
                event.reason,
                event.duration_s or 0.0,
                event.peak_score,
                _top_text(event),
            )
            self._logged[stream.id] = (last, suppressed, False)


def _peak(
    score: float,
    ts: float,
    channel_score: np.ndarray,
    observed: np.ndarray,
    expected: np.ndarray,
    word: int | None,
    sig: int | None,
) -> Peak:
    """A window kept as an alarm's peak: copies (the arrays are views of a reused batch)."""
    return Peak(score, ts, channel_score.copy(), observed.copy(), expected.copy(), word, sig)


def _top_text(event: Event) -> str:
    top = event.top_channels
    if not top:
        return "no channel stands out"
    return "top: " + ", ".join(f"{c.channel} {c.contribution:.0%} {c.direction}" for c in top)
