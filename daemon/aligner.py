"""Rows on the model's grid from channels that arrive on separate topics, at different rates."""

from __future__ import annotations

import heapq
import math

import numpy as np
import numpy.typing as npt

Float64Array = npt.NDArray[np.float64]

# Grid arithmetic tolerance, in periods: k periods "fit" in hold_s despite float rounding.
_EPS = 1e-9


class _Slot:
    """Values gathered for one grid slot: per-channel sums and counts."""

    __slots__ = ("counts", "present", "sums")

    def __init__(self, channels: int) -> None:
        self.sums = [0.0] * channels
        self.counts = [0] * channels
        self.present = 0  # channels with at least one value


class ChannelAligner:
    """Rows on the model's grid from channels that arrive separately, at different rates.

    A value at `ts` goes to slot round(ts / period_s); several values of a channel in one slot
    are averaged. A slot's row is emitted as soon as every channel has a value in it, or once
    it is older than `max_wait_s` (default: one period) behind the newest timestamp pushed, or
    behind `now_ts` in `flush`. Then a channel with no value in the slot takes its last value
    if that is at most `hold_s` old (default: 5 periods; sample-and-hold is how a slower channel
    meets the model's period), else the row is dropped and counted in `incomplete`.

    Rows come out oldest first, so a complete slot waits behind an older incomplete one. Values
    for a slot already emitted or dropped are dropped and counted in `late` (this includes the
    later values of a channel faster than the period once its slot's row is out). Memory: only
    slots within `max_wait_s` of the newest timestamp pushed are pending, at most
    floor(max_wait_s / period_s) + 2 of them (a timestamp far ahead therefore closes every
    older slot).
    """

    def __init__(
        self,
        channels: int,
        *,
        period_s: float,
        max_wait_s: float | None = None,
        hold_s: float | None = None,
    ) -> None:
        if channels < 1:
            raise ValueError("channels must be at least 1")
        if not (math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"period_s must be a positive number, got {period_s}")
        max_wait = period_s if max_wait_s is None else max_wait_s
        hold = 5 * period_s if hold_s is None else hold_s
        for name, value in (("max_wait_s", max_wait), ("hold_s", hold)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        self.channels = channels
        self.period_s = float(period_s)
        self.max_wait_s = float(max_wait)
        self.hold_s = float(hold)
        self._hold_slots = math.floor(hold / period_s + _EPS)
        self._pending: dict[int, _Slot] = {}
        self._order: list[int] = []  # heap of pending slots
        self._done: int | None = None  # newest slot emitted or dropped
        self._now = -math.inf  # newest timestamp pushed
        self._last_value = [0.0] * channels
        self._last_slot: list[int | None] = [None] * channels
        self.incomplete = 0
        self.late = 0

    def push(self, channel: int, ts: float, value: float) -> list[tuple[float, Float64Array]]:
        """Add one channel's value; returns the rows it completed, (grid ts, values [C])."""
        if not 0 <= channel < self.channels:
            raise IndexError(f"channel {channel} out of range 0..{self.channels - 1}")
        slot = math.floor(ts / self.period_s + 0.5)
        if self._done is not None and slot <= self._done:
            self.late += 1
            return []
        entry = self._pending.get(slot)
        if entry is None:
            entry = self._pending[slot] = _Slot(self.channels)
            heapq.heappush(self._order, slot)
        if not entry.counts[channel]:
            entry.present += 1
        entry.sums[channel] += value
        entry.counts[channel] += 1
        if ts > self._now:
            self._now = ts
        return self._emit(self._now)

    def flush(self, now_ts: float) -> list[tuple[float, Float64Array]]:
        """Rows whose slot is older than `now_ts - max_wait_s` (and complete ones behind them)."""
        return self._emit(now_ts)

    def _emit(self, now: float) -> list[tuple[float, Float64Array]]:
        rows: list[tuple[float, Float64Array]] = []
        limit = now - self.max_wait_s
        while self._order:
            slot = self._order[0]
            entry = self._pending[slot]
            if entry.present < self.channels and slot * self.period_s >= limit:
                break
            heapq.heappop(self._order)
            del self._pending[slot]
            self._done = slot
            row = self._row(slot, entry)
            if row is not None:
                rows.append((slot * self.period_s, row))
        return rows

    def _row(self, slot: int, entry: _Slot) -> Float64Array | None:
        """The slot's values, held where missing; None (counted) if a channel is too stale."""
        values = np.empty(self.channels, dtype=np.float64)
        complete = True
        for c, n in enumerate(entry.counts):
            if n:
                values[c] = self._last_value[c] = entry.sums[c] / n
                self._last_slot[c] = slot
                continue
            last = self._last_slot[c]
            if last is not None and slot - last <= self._hold_slots:
                values[c] = self._last_value[c]
            else:
                complete = False
        if not complete:
            self.incomplete += 1
            return None
        return values
