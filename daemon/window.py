"""Per-stream sample buffers: timestamped readings in, model windows out.

`StreamBuffer` puts one stream's readings on a regular grid of `period_s` (jitter under half a
period is ignored), drops duplicates and late readings, fills short gaps by linear interpolation
as the trainer does, restarts the window after a long one, and reports when a window is ready,
every `hop` samples. (`daemon.aligner.ChannelAligner` first turns channels that arrive on
separate topics, at different rates, into full rows on the model's grid.)

Both sit on the ingest hot path: a reading costs O(1) (a filled gap costs O(its length)) and is
written in place into a preallocated ring; the only allocations are the ones the caller keeps.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]

# Grid arithmetic tolerance, in periods: k periods "fit" in max_gap_s despite float rounding.
_EPS = 1e-9


# seq gaps larger than this are taken as a sender restart, not as lost readings.
MAX_SEQ_GAP = 2**32


class PushResult(enum.Enum):
    """What happened to a reading."""

    ACCEPTED = "accepted"  # committed (possibly after filling a short gap) or held for reordering
    DUPLICATE = "duplicate"  # a sample already committed or held: dropped
    LATE = "late"  # older than what is committed, and not a duplicate: dropped
    GAP_RESET = "gap_reset"  # committed after a gap > max_gap_s: the window restarted with it


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """The outcome of one `push` (or of one reading committed by `drain`).

    Frozen so that the common outcomes are shared constants: no allocation per reading.
    """

    result: PushResult
    windows_ready: int  # windows that became ready; fetch them with `take_at(0 .. n - 1)`
    seq_gap: int  # readings missing according to `seq`
    filled: int  # samples synthesised by interpolation
    # LATE only: this reading was never taken (not a redelivery of one that was): its slot is
    # in the ring and was interpolated, or its seq is in a gap `seq` showed.
    missed: bool = False

    def windows_only(self) -> PushOutcome:
        """This outcome with its counts cleared: a drained reading was counted on arrival."""
        return PushOutcome(PushResult.ACCEPTED, self.windows_ready, 0, 0)


_ACCEPTED = PushOutcome(PushResult.ACCEPTED, 0, 0, 0)
_READY = PushOutcome(PushResult.ACCEPTED, 1, 0, 0)
_DUPLICATE = PushOutcome(PushResult.DUPLICATE, 0, 0, 0)
_LATE = PushOutcome(PushResult.LATE, 0, 0, 0)
_MISSED = PushOutcome(PushResult.LATE, 0, 0, 0, missed=True)


def _merge(a: PushOutcome, b: PushOutcome) -> PushOutcome:
    """Two commits of one call as one outcome: counts add up, GAP_RESET wins over ACCEPTED."""
    if a is _ACCEPTED:
        return b
    if b is _ACCEPTED:
        return a
    reset = PushResult.GAP_RESET in (a.result, b.result)
    return PushOutcome(
        PushResult.GAP_RESET if reset else PushResult.ACCEPTED,
        a.windows_ready + b.windows_ready,
        a.seq_gap + b.seq_gap,
        a.filled + b.filled,
    )


class StreamBuffer:
    """One stream's samples on a regular grid, in a ring; a window every `hop` samples.

    Grid: the first reading after a reset anchors it (as the trainer's grid starts at the first
    row); a reading lands in the slot nearest its timestamp, so jitter under half a period from
    that grid is ignored and `last_ts` is a grid time. One slot ahead: committed.
    k slots ahead (k >= 2): the k - 1 missing samples are interpolated if k * period_s <=
    max_gap_s, else the window restarts with this reading (GAP_RESET). Interpolated samples
    count towards `hop` like received ones.

    Duplicates and late readings: a reading in the newest committed slot, or in an older slot
    that holds a received sample, is a DUPLICATE; one in an older slot that was interpolated is
    LATE with `missed` set (it never arrived in time: never taken). Beyond the ring, or before
    the last reset, it is a DUPLICATE if its `seq` is not above the last one (a QoS 1
    redelivery) unless that seq is in one of the last 8 gaps `seq` showed (LATE, missed); else
    LATE. A `seq` at or below the last one on a reading that is *newer* by time is taken as the
    sender restarting its counter: accepted, not counted as a gap, and the old gaps forgotten.

    Reordering: with `reorder_tolerance_s` > 0, readings are held until the newest timestamp
    seen is that much newer, then committed in time order; a reading whose slot is already
    committed when it arrives is dropped as above. Duplicates and late readings are decided when
    a reading is pushed, so a held reading is always committed: its push said ACCEPTED, and the
    call that commits it reports its windows, gaps and fills (and GAP_RESET if it restarted the
    window). One `push` may commit several held readings: their outcomes are merged (counts
    summed, GAP_RESET over ACCEPTED); `drain` returns one outcome per reading committed.

    Windows: the first is ready when `window` samples are in since the reset, then one every
    `hop` samples. A push that fills a gap can make several ready at once. `take_at(i)` copies
    the i-th newest of the windows made ready by the last `push` or `drain` call (0 = newest):
    to score EVERY window, loop `take_at(i)` for i below that call's total `windows_ready`.
    `take()` copies the newest `window` samples: the same as `take_at(0)` when one sample came
    in, but after a fill the newest ready window can end a few samples earlier. The ring keeps
    window + (max_gap_s + reorder_tolerance_s) / period_s samples, enough for all of them.
    """

    def __init__(
        self,
        window: int,
        channels: int,
        *,
        hop: int,
        period_s: float,
        max_gap_s: float,
        reorder_tolerance_s: float = 0.0,
    ) -> None:
        if window < 1 or channels < 1 or hop < 1:
            raise ValueError("window, channels and hop must be at least 1")
        if not (math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"period_s must be a positive number, got {period_s}")
        for name, value in (("max_gap_s", max_gap_s), ("reorder_tolerance_s", reorder_tolerance_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        self.window = window
        self.channels = channels
        self.hop = hop
        self.period_s = float(period_s)
        self.max_gap_s = float(max_gap_s)
        self.reorder_tolerance_s = float(reorder_tolerance_s)
        self._shape = (channels,)
        self._max_k = math.floor(max_gap_s / period_s + _EPS)  # longest step that is filled
        # Held readings are in distinct slots within the tolerance; spare rows absorb rounding.
        self._stage_rows = math.floor(reorder_tolerance_s / period_s) + 4
        # One call commits at most a filled gap plus what the reorder stage held: keeping that
        # much beyond one window keeps every window a call made ready reachable by take_at.
        self._capacity = window + self._max_k + self._stage_rows + 1
        self._buf: Float32Array = np.zeros((self._capacity, channels), dtype=np.float32)
        self._stage: Float64Array = np.zeros((self._stage_rows, channels), dtype=np.float64)
        self._received = [False] * self._capacity  # received (True) or interpolated, per row
        self._ready: list[int] = []  # sample numbers that ended a window, in the last call
        self._total = 0  # samples ever committed: numbers ring rows across resets
        self.reset()

    def reset(self, *, keep_seq: bool = False) -> None:
        """Forget the window, the grid, any held readings and (unless `keep_seq`) the seq.

        A stream that fell silent keeps its seq, so readings lost meanwhile still count as a
        gap and redeliveries as duplicates.
        """
        last_seq = getattr(self, "_last_seq", None) if keep_seq else None
        gaps = getattr(self, "_seq_gaps", None) if keep_seq else None
        self._anchor: float | None = None  # grid time of slot 0
        self._last_slot = 0  # slot of the newest committed sample (valid when _count > 0)
        self._count = 0  # samples committed since the reset
        self._until_ready = self.window  # samples until the next window is ready
        self._pos = self._capacity - 1  # ring row of the newest sample
        self._last_seq: int | None = last_seq
        # The newest seq ranges found missing (first, last): a reading from one that turns up
        # beyond the ring was never taken (LATE, missed), not a redelivery of one that was.
        self._seq_gaps: deque[tuple[int, int]] = gaps if gaps is not None else deque(maxlen=8)
        self._held: list[tuple[float, int, int, int | None]] = []  # heap: ts, slot, row, seq
        self._held_slots: set[int] = set()
        self._free_rows = list(range(self._stage_rows))
        self._newest_ts = -math.inf
        self._ready.clear()

    @property
    def last_ts(self) -> float | None:
        """Grid time of the newest committed sample; None before the first one."""
        if not self._count or self._anchor is None:
            return None
        return self._anchor + self._last_slot * self.period_s

    @property
    def filled_since_reset(self) -> int:
        """Samples committed (received or interpolated) since the window last restarted."""
        return self._count

    def push(self, ts: float, values: FloatArray, seq: int | None = None) -> PushOutcome:
        """Add a reading at unix time `ts`; `values` is float64 or float32 of shape [channels]."""
        if self._ready:
            self._ready.clear()
        if values.shape != self._shape:
            raise ValueError(f"expected values of shape {self._shape}, got {values.shape}")
        if self._anchor is None:
            self._anchor = ts
        slot = math.floor((ts - self._anchor) / self.period_s + 0.5)
        if self._count and slot <= self._last_slot:
            return self._old(slot, seq)
        if self.reorder_tolerance_s:
            return self._hold(ts, slot, values, seq)
        # The common case inline: the next slot, no sequence gap.
        if (
            self._count
            and slot == self._last_slot + 1
            and (seq is None or self._last_seq is None or seq == self._last_seq + 1)
        ):
            if seq is not None:
                self._last_seq = seq
            self._last_slot = slot
            pos = self._pos + 1
            if pos == self._capacity:
                pos = 0
            self._pos = pos
            self._buf[pos] = values
            self._received[pos] = True
            self._count += 1
            self._total += 1
            self._until_ready -= 1
            if self._until_ready:
                return _ACCEPTED
            self._until_ready = self.hop
            self._ready.append(self._total)
            return _READY
        return self._commit(ts, slot, values, seq)

    def drain(self, now_ts: float | None = None) -> list[PushOutcome]:
        """Commit held readings: all of them, or those older than `now_ts - tolerance`.

        Returns one outcome per reading committed (ACCEPTED or GAP_RESET: their pushes already
        said ACCEPTED, so they are not new readings); `take_at` then indexes every window they
        made ready together (their `windows_ready` summed), newest first.
        """
        self._ready.clear()
        limit = math.inf if now_ts is None else now_ts - self.reorder_tolerance_s
        outcomes = []
        while self._held and self._held[0][0] <= limit:
            outcomes.append(self._release())
        return outcomes

    def take(self, out: Float32Array | None = None) -> Float32Array:
        """The newest `window` samples, oldest first, as float32 [window, channels]."""
        if self._count < self.window:
            raise ValueError(f"only {self._count} of {self.window} samples since the last reset")
        return self._copy(self._pos, out)

    def take_at(self, index: int, out: Float32Array | None = None) -> Float32Array:
        """The `index`-th newest window made ready by the last push/drain call (0 = newest)."""
        if not 0 <= index < len(self._ready):
            raise IndexError(f"window {index} of {len(self._ready)} made ready by the last call")
        back = self._total - self._ready[-1 - index]
        return self._copy((self._pos - back) % self._capacity, out)

    def _copy(self, end: int, out: Float32Array | None) -> Float32Array:
        if out is None:
            out = np.empty((self.window, self.channels), dtype=np.float32)
        elif out.shape != (self.window, self.channels):
            raise ValueError(f"out must have shape {(self.window, self.channels)}")
        start = end + 1 - self.window
        if start >= 0:
            out[:] = self._buf[start : end + 1]
        else:  # the window wraps around the end of the ring
            out[:-start] = self._buf[start:]
            out[-start:] = self._buf[: end + 1]
        return out

    def _old(self, slot: int, seq: int | None) -> PushOutcome:
        """Classify a reading for a slot at or before the newest committed one."""
        back = self._last_slot - slot
        if back == 0:
            return _DUPLICATE
        if back < min(self._count, self._capacity):
            row = (self._pos - back) % self._capacity
            return _DUPLICATE if self._received[row] else _MISSED
        if seq is not None and self._last_seq is not None and seq <= self._last_seq:
            return _MISSED if any(lo <= seq <= hi for lo, hi in self._seq_gaps) else _DUPLICATE
        return _LATE

    def _hold(self, ts: float, slot: int, values: FloatArray, seq: int | None) -> PushOutcome:
        """Reorder stage: hold the reading, then commit, in time order, what is old enough."""
        if slot in self._held_slots:
            return _DUPLICATE
        if ts > self._newest_ts:
            self._newest_ts = ts
        cutoff = self._newest_ts - self.reorder_tolerance_s
        if ts <= cutoff:
            # Older than every held reading (those are all newer than the cutoff) and newer
            # than the committed ones: nothing to wait for.
            return self._commit(ts, slot, values, seq)
        outcome = _ACCEPTED
        if not self._free_rows:  # only when a gap reset re-slotted held readings onto one slot
            if ts < self._held[0][0]:
                return self._commit(ts, slot, values, seq)  # the oldest: nothing to wait for
            outcome = self._release()
        row = self._free_rows.pop()
        self._stage[row] = values
        heapq.heappush(self._held, (ts, slot, row, seq))
        self._held_slots.add(slot)
        while self._held[0][0] <= cutoff:
            outcome = _merge(outcome, self._release())
        return outcome

    def _release(self) -> PushOutcome:
        ts, slot, row, seq = heapq.heappop(self._held)
        self._held_slots.discard(slot)
        self._free_rows.append(row)
        return self._commit(ts, slot, self._stage[row], seq)

    def _commit(self, ts: float, slot: int, values: FloatArray, seq: int | None) -> PushOutcome:
        """Commit a reading newer than the newest committed sample (checked by the caller)."""
        seq_gap = 0
        if seq is not None:
            if self._last_seq is not None and seq > self._last_seq + 1:
                # A jump beyond any plausible loss is a sender that changed its counter.
                seq_gap = seq - self._last_seq - 1 if seq - self._last_seq <= MAX_SEQ_GAP else 0
                if seq_gap:
                    self._seq_gaps.append((self._last_seq + 1, seq - 1))
            elif self._last_seq is not None and seq <= self._last_seq:
                self._seq_gaps.clear()  # the old counter's gaps mean nothing now
            self._last_seq = seq  # also when lower: the sender restarted its counter
        result = PushResult.ACCEPTED
        step = slot - self._last_slot
        filled = 0
        if not self._count:
            self._last_slot = slot
        elif step <= 1:  # < 1 only for a held reading re-slotted by a gap reset: next slot
            self._last_slot += 1
        elif step <= self._max_k:
            filled = step - 1
            self._fill(filled, values)
            self._last_slot = slot
        else:
            result = PushResult.GAP_RESET
            self._restart_grid(ts)
        pos = self._pos + 1
        if pos == self._capacity:
            pos = 0
        self._pos = pos
        self._buf[pos] = values
        self._received[pos] = True
        ready = self._advance(filled + 1)
        if result is PushResult.ACCEPTED and not (seq_gap or filled):
            return _READY if ready == 1 else _ACCEPTED
        return PushOutcome(result, ready, seq_gap, filled)

    def _fill(self, n: int, values: FloatArray) -> None:
        """Write `n` samples interpolated between the newest sample and `values`."""
        last = self._buf[self._pos].astype(np.float64)
        steps = np.arange(1, n + 1, dtype=np.float64)[:, None] / (n + 1)
        block = last + (values - last) * steps
        rows = (self._pos + 1 + np.arange(n)) % self._capacity
        self._buf[rows] = block
        for r in rows.tolist():
            self._received[r] = False
        self._pos = int(rows[-1])

    def _restart_grid(self, ts: float) -> None:
        """A long gap: the window restarts, and the grid is re-anchored on this reading."""
        self._anchor = ts
        self._last_slot = 0
        self._count = 0
        self._until_ready = self.window
        if self._held:  # held slots were relative to the old anchor
            p = self.period_s
            self._held = [(t, math.floor((t - ts) / p + 0.5), r, s) for t, _, r, s in self._held]
            self._held_slots = {h[1] for h in self._held}

    def _advance(self, n: int) -> int:
        """Count `n` new samples; note and return how many windows they made ready."""
        first = self._total + self._until_ready  # sample number that completes the next window
        self._count += n
        self._total += n
        if n < self._until_ready:
            self._until_ready -= n
            return 0
        ready = range(first, self._total + 1, self.hop)
        self._ready.extend(ready)
        self._until_ready = self.hop - (self._total - first) % self.hop
        return len(ready)
