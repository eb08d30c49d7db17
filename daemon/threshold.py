"""A stream's trailing baseline: the median of its recent smoothed scores, for a dynamic threshold.

The buffer starts full of the calibrated normal level (`seed`), so a new stream adapts only once
it has seen half a buffer of its own windows; the median is recomputed every `refresh` windows,
which keeps the cost per window a fraction of a microsecond-sized sort.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TrailingBaseline:
    """Median of the last `size` values added (the seed fills slots not yet written)."""

    def __init__(self, size: int, refresh: int, seed: float) -> None:
        if size < 1 or refresh < 1:
            raise ValueError(f"size and refresh must be >= 1, got {size} and {refresh}")
        self.size = size
        self.refresh = refresh
        self.seed = seed
        self.fill(seed)

    def fill(self, value: float) -> None:
        """Every slot takes `value` (a new stream, or a level accepted as the new normal)."""
        self._values = np.full(self.size, value, dtype=np.float64)
        self._next = 0
        self._since = 0
        self.level = float(value)

    def add(self, value: float) -> None:
        """Take one window's smoothed score; the median follows every `refresh` values."""
        self._values[self._next] = value
        self._next = (self._next + 1) % self.size
        self._since += 1
        if self._since >= self.refresh:
            self._since = 0
            self.level = float(np.median(self._values))

    def snapshot(self) -> dict[str, Any]:
        # Oldest first, so a restored buffer of another size keeps the newest values.
        ordered = np.roll(self._values, -self._next)
        return {"values": ordered.tolist(), "since": self._since, "level": self.level}

    def restore(self, state: dict[str, Any]) -> None:
        """Take a snapshot back; a buffer of another size keeps the newest values."""
        values = np.asarray(state["values"], dtype=np.float64)
        kept = values[len(values) - min(len(values), self.size) :]
        self.fill(self.seed)
        self._values[self.size - len(kept) :] = kept  # oldest first: slot 0 is overwritten next
        self._since = int(state["since"]) % self.refresh
        self.level = float(state["level"])
