"""A stream's trailing baseline: a threshold that moves with its recent smoothed scores.

Two rules over the same trailing buffer (recomputed every `refresh` windows, which keeps the cost
per window small):
- median: `factor` x the median of the buffer, a threshold relative to the stream's typical level;
- nonparametric: Hundman et al.'s (KDD 2018) threshold, written from the paper: the epsilon =
  mean + z x std of the buffer (z searched over 2.5 .. 12) that best separates a few high runs
  from the rest (the largest relative drop of mean and std per flagged value and run), and never
  below the largest value under it / (1 - PRUNE), since an excursion that does not stand clear
  of the stream's normal ones is pruned as noise.
The buffer starts full of the calibrated normal level (`seed`), so a new stream adapts only once
it has seen enough of its own windows; `spread` (at the end of a stream's warm-up) lets the
windows it has seen take the seed's slots when they sit above it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Rule = Literal["median", "nonparametric"]
Z_VALUES = np.arange(2.5, 12.0, 0.5)
MAX_RUNS = 5  # more high runs than this in the buffer: that z is no candidate
PRUNE = 0.13  # an excursion must stand 13 % above the largest normal value (the paper's p)


def nonparametric(values: np.ndarray) -> float:
    """The paper's epsilon for a buffer of smoothed scores, and its pruning floor.

    Every candidate z at once: the rest's mean and std from prefix sums of the sorted buffer, the
    runs from the time-ordered buffer (one pass of len(Z_VALUES) x len(values) comparisons)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean, std = float(x.mean()), float(x.std())
    if std <= 0 or mean <= 0:
        return mean / (1 - PRUNE)
    eps = mean + Z_VALUES * std
    ordered = np.sort(x)
    below = np.searchsorted(ordered, eps, side="left")  # values < eps
    count = n - below
    s1, s2 = np.r_[0.0, np.cumsum(ordered)], np.r_[0.0, np.cumsum(ordered**2)]
    rest_n = np.maximum(below, 1)
    rest_mean = s1[below] / rest_n
    rest_std = np.sqrt(np.maximum(s2[below] / rest_n - rest_mean**2, 0.0))
    above = x[None, :] >= eps[:, None]
    runs = above[:, 0] + np.count_nonzero(above[:, 1:] & ~above[:, :-1], axis=1)
    gain = (mean - rest_mean) / mean + (std - rest_std) / std
    score = gain / np.maximum(count + runs**2, 1)  # count 0: not a candidate (valid below)
    valid = (count > 0) & (count < n // 2) & (runs <= MAX_RUNS)
    if valid.any():
        best = np.flatnonzero(valid & (score >= score[valid].max()))[-1]  # ties: the higher z
        pick = float(eps[best])
    else:
        pick = float(eps[-1])
    under = int(np.searchsorted(ordered, pick, side="left"))
    return max(pick, float(ordered[under - 1]) / (1 - PRUNE)) if under else pick


class TrailingBaseline:
    """The moving threshold over the last `size` values added (the seed fills unwritten slots)."""

    def __init__(
        self, size: int, refresh: int, seed: float, rule: Rule = "median", factor: float = 1.0
    ) -> None:
        if size < 1 or refresh < 1:
            raise ValueError(f"size and refresh must be >= 1, got {size} and {refresh}")
        self.size = size
        self.refresh = refresh
        self.seed = seed
        self.rule = rule
        self.factor = factor
        self.fill(seed)

    def fill(self, value: float) -> None:
        """Every slot takes `value` (a new stream, or a level accepted as the new normal)."""
        self._values = np.full(self.size, value, dtype=np.float64)
        self._next = 0
        self._since = 0
        self._written = 0  # slots holding added values (the others still hold the fill)
        self._update()

    def spread(self, minimum: int = 1) -> None:
        """Slots still holding the fill take the values added so far, repeated in time order:
        the buffer then describes the stream's own level, not the seed's (after a warm-up).
        Only with at least `minimum` (and one refresh) of its own, and above the seed."""
        if not max(minimum, self.refresh) <= self._written < self.size:
            return  # too few of its own to describe a level, or already full
        ordered = np.roll(self._values, -self._next)  # oldest first: the fill, then the added
        added = ordered[self.size - self._written :]
        if np.median(added) <= self.seed:
            return  # at or under its calibrated level: the calibrated seed stays (no lower bar)
        self._values = np.resize(added, self.size)  # added, added, ... (time order repeats)
        self._next = 0
        self._written = self.size
        self._update()

    def _update(self) -> None:
        if self.rule == "median":
            self.level = self.factor * float(np.median(self._values))
        else:
            ordered = np.roll(self._values, -self._next)  # oldest first: runs need time order
            self.level = nonparametric(ordered)

    def add(self, value: float) -> None:
        """Take one window's smoothed score; the threshold follows every `refresh` values."""
        self._values[self._next] = value
        self._next = (self._next + 1) % self.size
        self._since += 1
        self._written = min(self._written + 1, self.size)
        if self._since >= self.refresh:
            self._since = 0
            self._update()

    def snapshot(self) -> dict[str, Any]:
        # Oldest first, so a restored buffer of another size keeps the newest values.
        ordered = np.roll(self._values, -self._next)
        return {
            "values": ordered.tolist(),
            "since": self._since,
            "level": self.level,
            "written": self._written,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take a snapshot back; a buffer of another size keeps the newest values."""
        values = np.asarray(state["values"], dtype=np.float64)
        kept = values[len(values) - min(len(values), self.size) :]
        self.fill(self.seed)
        self._values[self.size - len(kept) :] = kept  # oldest first: slot 0 is overwritten next
        self._since = int(state["since"]) % self.refresh
        # Older snapshots have no count: that stream had been judged for a while.
        self._written = min(int(state.get("written", self.size)), self.size)
        self.level = float(state["level"])
