"""The last detection stage: k-of-n minimum duration, hysteresis, clear time and cool-down.

`AlarmState` decides one stream's alarm from a score and the thresholds in force for that window;
`daemon.detector.Detector` runs it after its other stages. `AlarmTracker` and `replay` are that
state machine with fixed thresholds and EWMA smoothing (what models without a `detection` section
were calibrated with), kept for callers that only have window scores.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

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


class AlarmState:
    """k-of-n / hysteresis / clear / cool-down of one stream, thresholds given per window."""

    def __init__(self, policy: AlarmPolicy) -> None:
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        """No alarm, no history (the caller ends an active alarm)."""
        self._recent: deque[bool] = deque(maxlen=self.policy.n)
        self.active = False
        self._below = 0
        self._cooldown = 0

    @property
    def cooling(self) -> bool:
        """In the cool-down after an alarm: windows above the threshold raise no new alarm."""
        return self._cooldown > 0

    def step(self, value: float, enter: float, leave: float) -> Transition | None:
        """Take one window's score against its enter / exit thresholds; the edge, if any."""
        p = self.policy
        self._recent.append(value >= enter)
        if self.active:
            self._below = self._below + 1 if value < leave else 0
            if self._below >= p.clear_windows:
                self.end()
                return Transition.END
            return None
        if self._cooldown > 0:
            self._cooldown -= 1
            return None
        if sum(self._recent) >= p.k:
            self.active = True
            self._below = 0
            return Transition.START
        return None

    def end(self) -> None:
        """End the active alarm now (clear time met, or a new normal accepted)."""
        self.active = False
        self._cooldown = self.policy.cooldown_windows
        self._recent.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "recent": list(self._recent),
            "active": self.active,
            "below": self._below,
            "cooldown": self._cooldown,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._recent = deque((bool(v) for v in state["recent"]), maxlen=self.policy.n)
        self.active = bool(state["active"])
        self._below = int(state["below"])
        self._cooldown = int(state["cooldown"])


class AlarmTracker:
    """Fixed thresholds and EWMA smoothing before `AlarmState`; `sensitivity` > 1 lowers both."""

    def __init__(self, policy: AlarmPolicy, sensitivity: float = 1.0) -> None:
        self.policy = policy
        self.sensitivity = sensitivity
        self._state = AlarmState(policy)
        self.reset()

    def reset(self) -> None:
        """Forget history (after a gap: a window never spans a hole, nor does smoothing)."""
        self._smoothed: float | None = None
        self._state.reset()

    @property
    def active(self) -> bool:
        return self._state.active

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
        transition = self._state.step(s, enter, leave)
        return Step(s, self._state.active, transition)


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
