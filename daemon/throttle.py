"""Rate limits for log lines about recurring conditions (a broker down, a bad item per second)."""

from __future__ import annotations

import math
import time

ERROR_LOG_EVERY_S = 60.0


class Throttle:
    """At most one log line per interval for a recurring error; counts what it held back."""

    def __init__(self, every_s: float = ERROR_LOG_EVERY_S) -> None:
        self._every_s = every_s
        self._last = -math.inf
        self.suppressed = 0

    def ready(self) -> bool:
        """True if a line may be logged now (then the interval starts again)."""
        now = time.monotonic()
        if now - self._last < self._every_s:
            self.suppressed += 1
            return False
        self._last, self.suppressed = now, 0
        return True
