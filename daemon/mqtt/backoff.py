"""Capped exponential back-off with jitter between connection attempts."""

from __future__ import annotations

import math
import random

CAP_LOG_EVERY_S = 300.0  # at the back-off cap, repeat the warning this rarely


class Backoff:
    """The delay before the next attempt; also decides which failures earn a log line."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self._min_s, self._max_s = min_s, max_s
        self.step_s = 0.0  # 0: no failure since the last success
        self.failures = 0
        self._reason = ""
        self._logged_at = -math.inf

    def failure(self, reason: str, now: float) -> tuple[float, bool]:
        """The delay before the next attempt, and whether to log this failure."""
        grew = self.step_s < self._max_s
        self.step_s = self._min_s if self.step_s == 0 else min(2 * self.step_s, self._max_s)
        self.failures += 1
        worth_logging = grew or reason != self._reason or now - self._logged_at >= CAP_LOG_EVERY_S
        self._reason = reason
        if worth_logging:
            self._logged_at = now
        # Up to 25 % shorter, so a fleet that lost its broker together does not return in step.
        return self.step_s * random.uniform(0.75, 1.0), worth_logging

    def reset(self) -> None:
        self.step_s, self.failures, self._reason = 0.0, 0, ""
