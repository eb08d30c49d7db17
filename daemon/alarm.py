"""Turn a stream's window scores into alarms: smoothing, k-of-n, hysteresis, cool-down.

The daemon feeds one `AlarmTracker` per stream window by window; `oteo evaluate`, threshold
calibration and the benchmarks call `replay` over a whole series. Both run the same `update`, so
offline numbers and live behaviour agree by construction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np

from daemon.manifest import AlarmPolicy


class Transition(Enum):
    START = "start"
    END = "end"


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one window: smoothed score, whether an alarm is active, and any edge."""

    smoothed: float
    active: bool
    transition: Transition | None


class AlarmTracker:
    """Alarm state of one stream. `sensitivity` > 1 lowers both thresholds (more alarms)."""

    def __init__(self, policy: AlarmPolicy, sensitivity: float = 1.0) -> None:
        self.policy = policy
        self.sensitivity = sensitivity
        self.reset()

    def reset(self) -> None:
        """Forget history (after a gap: a window never spans a hole, nor does smoothing)."""
        self._smoothed: float | None = None
        self._recent: deque[bool] = deque(maxlen=self.policy.n)
        self._active = False
        self._below = 0
        self._cooldown = 0

    @property
    def active(self) -> bool:
        return self._active

    @property
    def threshold(self) -> float:
        """The enter threshold in force for this stream (after its sensitivity)."""
        return self.policy.enter_threshold / self.sensitivity

    def update(self, score: float) -> Step:
        p = self.policy
        if self._smoothed is None:
            self._smoothed = score
        else:
            self._smoothed = p.smoothing_alpha * score + (1 - p.smoothing_alpha) * self._smoothed
        s = self._smoothed
        enter = p.enter_threshold / self.sensitivity
        leave = p.exit_threshold / self.sensitivity
        self._recent.append(s >= enter)
        if self._active:
            self._below = self._below + 1 if s < leave else 0
            if self._below >= p.clear_windows:
                self._active = False
                self._cooldown = p.cooldown_windows
                self._recent.clear()
                return Step(s, False, Transition.END)
            return Step(s, True, None)
        if self._cooldown > 0:
            self._cooldown -= 1
            return Step(s, False, None)
        if sum(self._recent) >= p.k:
            self._active = True
            self._below = 0
            return Step(s, True, Transition.START)
        return Step(s, False, None)


def replay(scores: np.ndarray, policy: AlarmPolicy, sensitivity: float = 1.0) -> np.ndarray:
    """Alarm state after each window of one contiguous series (NaN score = gap: reset)."""
    tracker = AlarmTracker(policy, sensitivity)
    active = np.zeros(len(scores), dtype=bool)
    for i, score in enumerate(scores.tolist()):
        if score != score:  # NaN marks a gap between segments
            tracker.reset()
            continue
        active[i] = tracker.update(score).active
    return active


def count_events(active: np.ndarray) -> int:
    """Number of alarm events (rising edges) in a boolean alarm series."""
    if active.size == 0:
        return 0
    a = active.astype(np.int8)
    return int(a[0] + np.count_nonzero(np.diff(a) == 1))
