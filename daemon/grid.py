"""The rules that put timestamped readings on a model's sample grid, in one place.

The trainer applies them to a whole recording at once (`to_grid`); the daemon applies the same
rules one reading at a time (`daemon.aligner.ChannelAligner` for channels arriving separately,
`daemon.window.StreamBuffer` for gaps), and a test feeds the same irregular, multi-rate readings
to both and compares the windows and scores:

1. The grid is anchored at the first timestamp; a reading at `ts` lands in slot
   `floor((ts - anchor) / period + 0.5)` (jitter under half a period is ignored).
2. Per channel, the first value in a slot wins; later ones are re-deliveries or jitter (dropped).
3. In a slot where some channels have a value, a channel without one holds its last value if that
   is at most `HOLD_PERIODS` slots old (a slower channel meets the model's period); otherwise the
   slot is incomplete and has no row.
4. A slot with no row is a gap: gaps up to `max_gap_s` are filled by linear interpolation between
   the rows around them, longer ones restart the window (the trainer splits its segments there).
"""

from __future__ import annotations

import math

import numpy as np

HOLD_PERIODS = 5  # how many slots a channel's last value may stand in for missing ones


def slot_of(ts: float, anchor: float, period_s: float) -> int:
    """The grid slot of a reading at `ts` (rule 1)."""
    return math.floor((ts - anchor) / period_s + 0.5)


def to_grid(
    times: np.ndarray, values: np.ndarray, period_s: float, hold_periods: int = HOLD_PERIODS
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [S, C] on the grid (rules 1-3; NaN rows: no row in that slot) and, per slot,
    whether any reading fell in it.

    `times` [T] ascending (ties keep file order), `values` [T, C] with NaN where a channel has
    no value in that reading.
    """
    slots = np.floor((times - times[0]) / period_s + 0.5).astype(np.int64)
    n_slots = int(slots[-1]) + 1
    grid = np.full((n_slots, values.shape[1]), np.nan)
    present = np.zeros((n_slots, values.shape[1]), dtype=bool)
    for c in range(values.shape[1]):
        ok = ~np.isnan(values[:, c])
        first_slot, first_row = np.unique(slots[ok], return_index=True)  # rule 2
        grid[first_slot, c] = values[ok, c][first_row]
        present[first_slot, c] = True
    observed = np.bincount(slots, minlength=n_slots) > 0
    return hold_missing(grid, hold_periods), observed


def hold_missing(grid: np.ndarray, hold_periods: int = HOLD_PERIODS) -> np.ndarray:
    """Rule 3 on rows already on the grid [S, C] (NaN: no value): missing values held from the
    channel's last one for up to `hold_periods` slots in rows that have some value; rows still
    incomplete, and empty ones, become all-NaN (gaps). Returns a new array."""
    out = np.array(grid, dtype=np.float64)
    present = ~np.isnan(out)
    some: np.ndarray = np.asarray(present.any(axis=1))
    for c in range(out.shape[1]):
        _hold(out[:, c], present[:, c], some, hold_periods)
    out[~some | np.isnan(out).any(axis=1)] = np.nan
    return out


def _hold(column: np.ndarray, present: np.ndarray, some: np.ndarray, hold: int) -> None:
    """Rule 3 in place: fill a channel's missing slots (that have a row) from its last value."""
    idx = np.where(present, np.arange(len(column)), -1)
    last = np.maximum.accumulate(idx)  # slot of the channel's latest value at or before each slot
    fill = some & ~present & (last >= 0) & (np.arange(len(column)) - last <= hold)
    column[fill] = column[last[fill]]
