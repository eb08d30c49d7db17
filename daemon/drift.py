"""The drift signal: the share of windows over the last hour that scored above the normal p99.

A model's normal p99 is, by definition, exceeded by about 1 % of windows of data like its
training data; a share that stays well above that says the data has moved away from what the
model learned (wear, a new set point, a season) before the alarms flood. Counts are kept in
one-minute buckets of monotonic time, so the share covers the last hour whatever the rate of
windows, and an idle hour forgets what came before.
"""

from __future__ import annotations

BUCKET_S = 60.0
BUCKETS = 60  # one hour


class DriftMeter:
    """Windows and windows above p99, per minute, over the last `BUCKETS` minutes."""

    def __init__(self, bucket_s: float = BUCKET_S, buckets: int = BUCKETS) -> None:
        self.bucket_s = bucket_s
        self._windows = [0] * buckets
        self._above = [0] * buckets
        self._last: int | None = None  # index (absolute minute) of the newest bucket

    def add(self, now: float, windows: int, above: int) -> None:
        """Count `windows` scored (of which `above` over p99) at monotonic time `now`."""
        minute = int(now // self.bucket_s)
        n = len(self._windows)
        if self._last is None or minute - self._last >= n:
            self._windows, self._above = [0] * n, [0] * n
        elif minute > self._last:
            for m in range(self._last + 1, minute + 1):
                self._windows[m % n] = self._above[m % n] = 0
        if self._last is None or minute > self._last:
            self._last = minute
        self._windows[minute % n] += windows
        self._above[minute % n] += above

    def ratio(self, now: float) -> float:
        """Share of the last hour's windows above p99; 0 when none were scored."""
        self.add(now, 0, 0)  # expire buckets older than an hour
        total = sum(self._windows)
        return sum(self._above) / total if total else 0.0

    def reset(self) -> None:
        """Forget everything (a new model has other quantiles)."""
        n = len(self._windows)
        self._windows, self._above, self._last = [0] * n, [0] * n, None
