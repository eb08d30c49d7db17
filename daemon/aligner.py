"""Rows on the model's grid from channels that arrive on separate topics, at different rates.

The rules are `daemon.grid`'s, applied one value at a time (the trainer applies them to a whole
recording): grid anchored at the first value, first value of a channel in a slot wins, a missing
channel holds its last value for up to `HOLD_PERIODS` slots.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import numpy.typing as npt

from daemon.grid import HOLD_PERIODS, slot_of

Float64Array = npt.NDArray[np.float64]

# Grid arithmetic tolerance, in periods: k periods "fit" in hold_s despite float rounding.
_EPS = 1e-9


class _Slot:
    """Values gathered for one grid slot: the first value of each channel."""

    __slots__ = ("has", "present", "values")

    def __init__(self, channels: int) -> None:
        self.values = [0.0] * channels
        self.has = [False] * channels
        self.present = 0  # channels with a value


class ChannelAligner:
    """Rows on the model's grid from channels that arrive separately, at different rates.

    The first value pushed anchors the grid; a value at `ts` goes to slot
    round((ts - anchor) / period_s); the first value of a channel in a slot wins, later ones are
    counted in `duplicates`. A slot's row is emitted as soon as every channel has a value in it,
    or once it is older than `max_wait_s` (default: one period) behind the newest timestamp
    pushed, or behind `now_ts` in `flush`. Then a channel with no value in the slot takes its
    last value if that is at most `hold_s` old (default: 5 periods; sample-and-hold is how a
    slower channel meets the model's period), else the row is dropped and counted in
    `incomplete`.

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
        hold = HOLD_PERIODS * period_s if hold_s is None else hold_s
        for name, value in (("max_wait_s", max_wait), ("hold_s", hold)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        self.channels = channels
        self.period_s = float(period_s)
        self.max_wait_s = float(max_wait)
        self.hold_s = float(hold)
        self._hold_slots = math.floor(hold / period_s + _EPS)
        self._anchor: float | None = None
        self._pending: dict[int, _Slot] = {}
        self._order: list[int] = []  # heap of pending slots
        self._done: int | None = None  # newest slot emitted or dropped
        self._now = -math.inf  # newest timestamp pushed
        self._last_value = [0.0] * channels
        self._last_slot: list[int | None] = [None] * channels
        self.incomplete = 0
        self.late = 0
        self.duplicates = 0

    def push(self, channel: int, ts: float, value: float) -> list[tuple[float, Float64Array]]:
        """Add one channel's value; returns the rows it completed, (grid ts, values [C])."""
        if not 0 <= channel < self.channels:
            raise IndexError(f"channel {channel} out of range 0..{self.channels - 1}")
        if self._anchor is None:
            self._anchor = ts
        slot = slot_of(ts, self._anchor, self.period_s)
        if self._done is not None and slot <= self._done:
            self.late += 1
            return []
        entry = self._pending.get(slot)
        if entry is None:
            entry = self._pending[slot] = _Slot(self.channels)
            heapq.heappush(self._order, slot)
        if entry.has[channel]:
            self.duplicates += 1
            return []
        entry.has[channel] = True
        entry.values[channel] = value
        entry.present += 1
        if ts > self._now:
            self._now = ts
        return self._emit(self._now)

    def flush(self, now_ts: float) -> list[tuple[float, Float64Array]]:
        """Rows whose slot is older than `now_ts - max_wait_s` (and complete ones behind them)."""
        return self._emit(now_ts)

    def _emit(self, now: float) -> list[tuple[float, Float64Array]]:
        rows: list[tuple[float, Float64Array]] = []
        if self._anchor is None:
            return rows
        limit = now - self.max_wait_s
        while self._order:
            slot = self._order[0]
            entry = self._pending[slot]
            ts = self._anchor + slot * self.period_s
            if entry.present < self.channels and ts >= limit:
                break
            heapq.heappop(self._order)
            del self._pending[slot]
            self._done = slot
            row = self._row(slot, entry)
            if row is not None:
                rows.append((ts, row))
        return rows

    def _row(self, slot: int, entry: _Slot) -> Float64Array | None:
        """The slot's values, held where missing; None (counted) if a channel is too stale."""
        values = np.empty(self.channels, dtype=np.float64)
        complete = True
        for c, has in enumerate(entry.has):
            if has:
                values[c] = self._last_value[c] = entry.values[c]
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
