"""One stream's detection stages: per-channel window errors in, alarm decisions out.

The stages, configured by the manifest's `detection` section and calibrated by the trainer:
1. error: per channel the graph's mean squared error, or its root; optionally divided by the
   channel's normal level; combined by mean or max (`combine_errors`);
2. smoothing: an EWMA (the alarm policy's `smoothing_alpha`);
3. threshold: the calibrated enter / exit thresholds, raised to a threshold that moves with the
   stream's recent smoothed scores when `baseline_samples` is set (daemon/threshold.py); all divided
   by the stream's sensitivity; the stage whose bar is in force is named (`threshold_source`);
4. alarm: k-of-n, hysteresis, clear time, cool-down (daemon/alarm.py);
5. new normal: an alarm that has lasted `new_normal_s` ends, flagged, and the baseline takes
   its level, so a sustained change is accepted visibly, never silently; an alarm ended by the
   new-level window (`new_level_s`) is flagged too, and with `baseline_learns_accepted` the
   dynamic threshold's trailing window takes in that episode's windows;
6. warm-up: a new stream's first `warmup_s` of windows fill its trailing windows and are judged
   only against `warmup_factor` x the calibrated thresholds (factor 0: no alarm at all); windows
   in alarm are not learnt. A gap does not restart it; a model swap carries it over.

The daemon, `oteo evaluate`, the trainer's calibration and the benchmarks all run `update`
(`replay` loops over it), so offline numbers and live behaviour agree by construction.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.alarm import AlarmState, Transition
from daemon.manifest import AlarmPolicy, Detection, Manifest
from daemon.messages import ThresholdSource
from daemon.threshold import TrailingBaseline

if TYPE_CHECKING:
    from daemon.section import AlarmSection

SNAPSHOT_VERSION = 2  # 2: the active episode's windows (version 1 is still read)
READABLE_VERSIONS = (1, 2)
Bar = tuple[ThresholdSource, float, float]  # a stage's enter and exit threshold


class SnapshotError(ValueError):
    """A saved detector state that does not belong to this model or cannot be read."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One window's outcome."""

    score: float  # the stream's smoothed, combined score (what is compared to threshold)
    threshold: float  # the enter threshold in force now (after sensitivity; may move)
    active: bool  # in alarm after this window
    transition: Transition | None
    new_normal: bool = False  # END because the baseline accepted a sustained new level


@dataclass(frozen=True)
class Stages:
    """What a detector needs of a model file: its detection settings, clock and identity."""

    detection: Detection
    period_s: float
    model_id: str  # snapshots of another model are refused
    targets: tuple[int, ...] | None = None  # the scored channels (None: all)

    @classmethod
    def of(cls, manifest: Manifest) -> Stages:
        detection = manifest.detection or Detection.legacy()
        digest = hashlib.sha256(manifest.to_json().encode()).hexdigest()[:16]
        targets = tuple(manifest.target_indices()) if manifest.roles else None
        return cls(detection, manifest.sample_period_s, digest, targets)

    def overridden(self, alarm: AlarmSection | None) -> Stages:
        """These stages with a config's `[alarm]` overrides of the moving thresholds (unset: the
        model's own setting; 0: off)."""
        update: dict[str, Any] = {}
        if alarm is not None and alarm.baseline_samples is not None:
            update["baseline_samples"] = alarm.baseline_samples or None
        if alarm is not None and alarm.new_level_s is not None:
            update["new_level_s"] = alarm.new_level_s or None
        if alarm is not None and alarm.warmup_s is not None:
            update["warmup_s"] = alarm.warmup_s or None
        if alarm is not None and alarm.warmup_factor is not None:
            update["warmup_factor"] = alarm.warmup_factor
        if alarm is not None and alarm.baseline_learns_accepted is not None:
            update["baseline_learns_accepted"] = alarm.baseline_learns_accepted
        return replace(self, detection=self.detection.model_copy(update=update)) if update else self


def combine_errors(
    detection: Detection,
    score: np.ndarray,
    channel_score: np.ndarray,
    targets: tuple[int, ...] | None = None,
) -> np.ndarray:
    """The detection score of windows: score [B], channel_score [B, C] -> [B].

    Only `targets` channels count (the others are model inputs only, their error 0)."""
    d = detection
    if d.sample == "window" and d.error == "squared" and not d.normalise and d.combine == "mean":
        return np.asarray(score, dtype=np.float64)  # the graph's own score, bit for bit
    err = np.asarray(channel_score, dtype=np.float64)
    level = None if d.channel_level is None else np.asarray(d.channel_level, dtype=np.float64)
    if targets is not None:
        err = err[:, list(targets)]
        level = None if level is None else level[list(targets)]
    if d.error == "root":
        err = np.sqrt(np.maximum(err, 0.0))
    if d.normalise and level is not None:
        err = err / level
    out: np.ndarray = err.max(axis=-1) if d.combine == "max" else err.mean(axis=-1)
    return out


class Detector:
    """One stream's stages: window errors in, alarm decisions out. Only the main loop calls it."""

    def __init__(
        self, manifest: Manifest | Stages, policy: AlarmPolicy, sensitivity: float = 1.0
    ) -> None:
        self.stages = manifest if isinstance(manifest, Stages) else Stages.of(manifest)
        self.policy = policy
        self.sensitivity = sensitivity
        d = self.stages.detection
        window_s = self.stages.period_s * policy.hop
        self._baseline: TrailingBaseline | None = None
        if d.baseline_samples is not None:
            size = max(1, round(d.baseline_samples / policy.hop))
            seed = d.baseline_seed if d.baseline_seed is not None else 0.0
            self._baseline = TrailingBaseline(
                size, d.baseline_refresh, seed, d.baseline_rule, d.baseline_factor
            )
        self._level: TrailingBaseline | None = None
        if d.new_level_s is not None:
            size = max(1, round(d.new_level_s / window_s))
            seed = d.baseline_seed if d.baseline_seed is not None else 0.0
            self._level = TrailingBaseline(
                size, d.baseline_refresh, seed, "median", d.baseline_factor
            )
        self._new_normal_windows = (
            None if d.new_normal_s is None else max(1, math.ceil(d.new_normal_s / window_s))
        )
        self._warmup_windows = 0 if d.warmup_s is None else math.ceil(d.warmup_s / window_s)
        self._seen = 0  # windows decided since the stream was new
        self._ratio = policy.exit_threshold / policy.enter_threshold
        self._alarm = AlarmState(policy)
        self._smoothed: float | None = None
        self._alarm_windows = 0
        # The smoothed scores of the active alarm, for the trailing window to take in if the
        # new-level stage accepts the episode (only when that window does not take them anyway).
        learns = d.baseline_learns_accepted and not d.baseline_in_alarm
        self._episode: deque[float] | None = None
        if learns and self._baseline is not None and self._level is not None:
            self._episode = deque(maxlen=self._baseline.size)

    @property
    def active(self) -> bool:
        return self._alarm.active

    @property
    def threshold(self) -> float:
        """The enter threshold in force for this stream now (after its sensitivity)."""
        return self._thresholds()[0]

    @property
    def threshold_source(self) -> ThresholdSource:
        """The stage whose bar is the enter threshold in force (the first of equal ones)."""
        return max(self._bars(), key=lambda bar: bar[1])[0]

    def _bars(self, level: bool = True) -> list[Bar]:
        """(stage, enter, exit) of each stage's bar, after sensitivity: the calibrated one (x
        warmup_factor in the warm-up), the dynamic one, the new level's (only if `level`)."""
        p, sens = self.policy, self.sensitivity
        warm = self._seen < self._warmup_windows
        f = max(self.stages.detection.warmup_factor, 1.0) if warm else 1.0
        enter, leave = p.enter_threshold / sens * f, p.exit_threshold / sens * f
        bars: list[Bar] = [("warm_up" if warm else "calibrated", enter, leave)]
        if self._baseline is not None:
            moving = self._baseline.level / sens
            bars.append(("dynamic", moving, moving * self._ratio))
        if level and self._level is not None:
            high = self._level.level / sens
            bars.append(("new_level", high, high * self._ratio))
        return bars

    def _thresholds(self, level: bool = True) -> tuple[float, float]:
        """Enter / exit thresholds in force: the highest bar of the stages, each on its own."""
        bars = self._bars(level)
        return max(bar[1] for bar in bars), max(bar[2] for bar in bars)

    def update(
        self, score: float, channel_score: np.ndarray, newest: np.ndarray | None = None
    ) -> Decision:
        """Decide one window from its score, channel scores [C] and, for detection.sample
        "newest", the squared standardised error of its newest sample per channel [C]."""
        st = self.stages
        channel = newest if st.detection.sample == "newest" else channel_score
        if channel is None:
            raise ValueError("detection.sample is 'newest': pass the newest sample's errors")
        value = combine_errors(
            st.detection, np.asarray([score]), np.asarray(channel)[None, :], st.targets
        )
        return self.decide(float(value[0]))

    def decide(self, value: float) -> Decision:
        """Decide one window from its combined (not yet smoothed) detection score."""
        a = self.policy.smoothing_alpha
        s = value if self._smoothed is None else a * value + (1 - a) * self._smoothed
        self._smoothed = s
        enter, leave = self._thresholds()
        warming = self._seen < self._warmup_windows
        if warming and not self.stages.detection.warmup_factor:
            # Silent warm-up: the trailing windows learn the stream's own level, no alarm.
            self._seen += 1
            self._learn(s, in_alarm=False)
            self._end_warmup()
            return Decision(s, enter, False, None)
        cooling = self._alarm.cooling
        transition = self._alarm.step(s, enter, leave)
        new_normal = False
        if transition is Transition.START:
            self._alarm_windows = 0
            if self._episode is not None:
                self._episode.clear()
        if self._alarm.active:
            self._alarm_windows += 1
            if self._episode is not None:
                self._episode.append(s)
            if self._new_normal_windows and self._alarm_windows >= self._new_normal_windows:
                # The level has lasted the configured time: it is the stream's normal now.
                self._alarm.end()
                self._accept(s)
                transition, new_normal = Transition.END, True
        elif transition is Transition.END:
            # Ended while still above the calibrated exit: a moving threshold ended it.
            new_normal = s >= self.policy.exit_threshold / self.sensitivity
            if new_normal:
                self._learn_if_accepted(s)
        # A window at or above the enter threshold during a cool-down raises no alarm, yet it is
        # not normal: the dynamic threshold does not learn it, or a recurring fault whose onsets
        # fall in the cool-down lifts the threshold over itself.
        high = cooling and s >= enter
        if warming:
            self._seen += 1
            # A fault at a stream's start must not become its normal: alarm windows stay out.
            if not self._alarm.active and not high:
                self._learn(s, in_alarm=False)
            self._end_warmup()
        else:
            self._seen = self._warmup_windows
            self._learn(s, in_alarm=self._alarm.active or high)
        if transition is Transition.END:
            self._alarm_windows = 0
            if self._episode is not None:
                self._episode.clear()
        return Decision(s, enter, self._alarm.active, transition, new_normal)

    def _learn(self, s: float, in_alarm: bool) -> None:
        """The trailing windows take one window's smoothed score (the dynamic threshold's only
        from normal windows unless baseline_in_alarm; the new-level window from all)."""
        if self._baseline is not None and (not in_alarm or self.stages.detection.baseline_in_alarm):
            self._baseline.add(s)
        if self._level is not None:
            self._level.add(s)

    def _end_warmup(self) -> None:
        """At the warm-up's last window the trailing windows describe the stream's own level:
        what it taught them fills the slots the calibrated seed still holds, if the stream sat
        above that seed and most of its warm-up was normal (windows in alarm are not learnt)."""
        if self._seen == self._warmup_windows:
            for buffer in (self._baseline, self._level):
                if buffer is not None:
                    buffer.spread(minimum=(self._warmup_windows + 1) // 2)

    def _learn_if_accepted(self, s: float) -> None:
        """At an END above the calibrated exit: if only the new-level window held `s` above the
        exit, it accepted this level, and the dynamic threshold learns the episode as normal."""
        if self._episode is None or self._baseline is None:
            return
        if s >= self._thresholds(level=False)[1]:
            for value in self._episode:
                self._baseline.add(value)

    def _accept(self, level: float) -> None:
        for buffer in (self._baseline, self._level):
            if buffer is not None:
                buffer.fill(level)
        if self._episode is not None:
            self._episode.clear()

    def reset(self) -> None:
        """A gap: smoothing and the alarm restart (the caller emits the end); baselines stay."""
        self._smoothed = None
        self._alarm.reset()
        self._alarm_windows = 0
        if self._episode is not None:
            self._episode.clear()

    def follow(self, previous: Detector) -> None:
        """After a model swap: carry the previous detector's alarm state and warm-up progress
        (a stream already judged is not blind again), not its baselines."""
        self._alarm.restore(previous._alarm.snapshot())
        self._alarm_windows = previous._alarm_windows
        done = previous._seen >= previous._warmup_windows
        self._seen = self._warmup_windows if done else min(previous._seen, self._warmup_windows)

    def snapshot(self, *, moving: bool = True) -> dict[str, Any]:
        """JSON-able state, to survive a restart. `moving=False` leaves out the baseline and
        new-level buffers (the bulk: thousands of values; a restore then keeps its own)."""
        return {
            "version": SNAPSHOT_VERSION,
            "model": self.stages.model_id,
            "smoothed": self._smoothed,
            "alarm": self._alarm.snapshot(),
            "alarm_windows": self._alarm_windows,
            "seen": self._seen,
            "baseline": None if self._baseline is None or not moving else self._baseline.snapshot(),
            "new_level": None if self._level is None or not moving else self._level.snapshot(),
            "episode": None if self._episode is None or not moving else list(self._episode),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Take a snapshot back; SnapshotError if it is another model's or unreadable."""
        if snapshot.get("version") not in READABLE_VERSIONS:
            raise SnapshotError(f"detector snapshot version {snapshot.get('version')!r}")
        if snapshot.get("model") != self.stages.model_id:
            raise SnapshotError("detector snapshot belongs to another model")
        try:
            smoothed = snapshot["smoothed"]
            self._smoothed = None if smoothed is None else float(smoothed)
            self._alarm.restore(snapshot["alarm"])
            self._alarm_windows = int(snapshot["alarm_windows"])
            # A snapshot from before the warm-up existed: that stream was already being judged.
            self._seen = min(int(snapshot.get("seen", self._warmup_windows)), self._warmup_windows)
            if self._baseline is not None and snapshot["baseline"] is not None:
                self._baseline.restore(snapshot["baseline"])
            if self._level is not None and snapshot.get("new_level") is not None:
                self._level.restore(snapshot["new_level"])
            episode = snapshot.get("episode")
            if self._episode is not None and episode is not None:
                # Version 1 had no episode: an alarm then active is learnt from here on only.
                self._episode.clear()
                self._episode.extend(float(v) for v in episode)
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"detector snapshot is malformed ({exc!r})") from exc


@dataclass(frozen=True)
class Replay:
    """Per window of a replayed series (NaN rows are gaps: NaN score and threshold)."""

    score: np.ndarray  # [T] smoothed combined score
    threshold: np.ndarray  # [T] enter threshold in force
    active: np.ndarray  # [T] bool
    new_normal: np.ndarray  # [T] bool, True on an END that accepted a new normal

    @property
    def events(self) -> int:
        """Alarm starts (rising edges; a series that opens in alarm counts one)."""
        a = self.active.astype(np.int8)
        return int(a[0] + np.count_nonzero(np.diff(a) == 1)) if len(a) else 0


def replay(
    manifest: Manifest | Stages,
    policy: AlarmPolicy,
    score: np.ndarray,
    channel_score: np.ndarray,
    sensitivity: float = 1.0,
    newest: np.ndarray | None = None,
) -> Replay:
    """Run one detector window by window over score [T], channel_score [T, C] (NaN score: gap)
    and, for detection.sample "newest", the newest samples' errors [T, C]."""
    detector = Detector(manifest, policy, sensitivity)
    score = np.asarray(score, dtype=np.float64)
    gap = np.isnan(score)
    if detector.stages.detection.sample == "newest":
        if newest is None:
            raise ValueError("detection.sample is 'newest': pass the newest samples' errors")
        channel_score = newest
    channel = np.nan_to_num(np.asarray(channel_score, dtype=np.float64).reshape(len(score), -1))
    # Combining is stateless: done for all rows at once, with the very function `update` calls.
    st = detector.stages
    values = combine_errors(st.detection, np.nan_to_num(score), channel, st.targets).tolist()
    n = len(score)
    smoothed, threshold = np.full(n, np.nan), np.full(n, np.nan)
    active, accepted = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i, value in enumerate(values):
        if gap[i]:
            detector.reset()
            continue
        d = detector.decide(value)
        smoothed[i], threshold[i] = d.score, d.threshold
        active[i], accepted[i] = d.active, d.new_normal
    return Replay(smoothed, threshold, active, accepted)
