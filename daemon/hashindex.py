"""Similar-window search: the hash code of every recorded window, searched by Hamming distance.

Rows (stream, time, score, alarm, event, code word) sit in columns of a growable ring: a row's
global id only grows, its slot is `id & mask`, so dropping the oldest rows only moves `first`.
Beside the rows, every distinct key (the word when `bits` <= 16, else its low 16 bits) lists the
ids of its rows in insertion order. Codes of normal operation fill few keys, so a search computes
the distance to every used key (at most 65,536, one vectorised popcount), then walks the keys
radius by radius and stops once k rows are nearer than the next radius. Within a key, the
newest rows are found from the end of its list; `_lag` (the most that a row's time fell behind
an earlier row's) bounds how much older rows may be newer, so a long list is rarely read whole.
Alarm windows also sit in their own id list, searched by brute force (`alarm_only`, events).

Threads: one writer calls `add` / `add_many`; searches run in other threads. `add` holds
`_write` for a few microseconds; a search holds it only to copy references and lengths (a
snapshot, ~0.1 ms for 65,536 keys), then reads arrays that the writer only appends to beyond
the snapshot (a growth swaps in new arrays, leaving the old ones intact). Retention
(`drop_before`, `drop_oldest`) holds `_search` as well, so no search sees rows vanish under it;
it may wait behind a search, `add` never does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from math import inf
from typing import Any

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int64]
KEY_BITS = 16
DEAD = 0xFFFF  # stream index of a row dropped out of insertion order (drop_before)
_SMALL = 256  # a key's list up to this length is read whole, longer ones from the end
_NO_IDS: Ids = np.zeros(0, dtype=np.int64)
_POP16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def popcount(x: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Set bits of each unsigned integer (np.bitwise_count on numpy >= 2, a table before)."""
    count = getattr(np, "bitwise_count", None)
    if count is not None:
        return np.asarray(count(x), dtype=np.int64)
    x = np.asarray(x).astype(np.uint64)
    total = np.zeros(x.shape, dtype=np.int64)
    for shift in range(0, 64, 16):
        total += _POP16[((x >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.intp)]
    return total


def hash_bits(code: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """[B, K] codes -> [B] uint64 words, bit i = code[:, i] > cut[i]. K <= 64 (else ValueError)."""
    code = np.asarray(code)
    if code.ndim != 2:
        raise ValueError(f"code must be [batch, units], got shape {code.shape}")
    units = code.shape[1]
    if not 1 <= units <= 64:
        raise ValueError(f"code has {units} units; a hash word holds 1 to 64 bits")
    bits = np.zeros((code.shape[0], 64), dtype=bool)
    bits[:, :units] = code > np.asarray(cut).reshape(1, units)
    packed = np.packbits(bits, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").reshape(-1).astype(np.uint64)


def word_dtype(bits: int) -> type[np.unsignedinteger[Any]]:
    """The narrowest unsigned dtype that holds a word of `bits` bits."""
    for dtype, width in ((np.uint8, 8), (np.uint16, 16), (np.uint32, 32), (np.uint64, 64)):
        if bits <= width:
            return dtype
    raise ValueError(f"bits must be 1 to 64, got {bits}")


@dataclass(frozen=True, slots=True)
class Hit:
    """A past window near the query."""

    stream: str
    ts: float  # data time of the window's newest sample (unix s)
    distance: int  # Hamming distance to the query
    score: float
    alarm: bool  # the window was in an alarm
    event_id: str | None  # that alarm's event id


@dataclass(frozen=True, slots=True)
class EventHit:
    """A past alarm episode near the query."""

    event_id: str
    stream: str
    ts: float  # the matching window's time
    distance: int  # min over that event's windows


class _Column:
    """The row columns of a ring whose capacity is a power of two."""

    def __init__(self, capacity: int, word: type[np.unsignedinteger[Any]]) -> None:
        self.mask = capacity - 1
        self.stream = np.zeros(capacity, dtype=np.uint16)
        self.ts = np.zeros(capacity, dtype=np.float64)
        self.score = np.zeros(capacity, dtype=np.float32)
        self.alarm = np.zeros(capacity, dtype=np.bool_)
        self.event = np.full(capacity, -1, dtype=np.int32)
        self.word = np.zeros(capacity, dtype=word)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.stream, self.ts, self.score, self.alarm, self.event, self.word)

    def regrow(self, first: int, end: int, capacity: int) -> _Column:
        """A copy with `capacity` slots holding rows first..end-1 (a new object: readers of
        this one keep a consistent view)."""
        grown = _Column(capacity, self.word.dtype.type)
        ids = np.arange(first, end, dtype=np.int64)
        for new, old in zip(grown.arrays(), self.arrays(), strict=True):
            new[ids & grown.mask] = old[ids & self.mask]
        return grown


@dataclass(frozen=True, slots=True)
class _Snapshot:
    col: _Column
    first: int
    end: int
    lag: float
    lists: list[Ids | None]
    fill: Ids
    alarms: Ids


@dataclass(frozen=True, slots=True)
class _Filter:
    stream: int  # -1: no exclusion
    from_ts: float
    to_ts: float

    def keep(self, col: _Column, pos: Ids) -> npt.NDArray[np.bool_]:
        stream = col.stream[pos]
        keep: npt.NDArray[np.bool_] = stream != DEAD
        if self.stream >= 0:
            ts = col.ts[pos]
            keep &= (stream != self.stream) | (ts < self.from_ts) | (ts > self.to_ts)
        return keep


class CodeIndex:
    """Hash codes of past windows, searched for the nearest by Hamming distance."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._word = word_dtype(bits)
        self._key_mask = (1 << min(bits, KEY_BITS)) - 1
        self._col = _Column(1024, self._word)
        self._first = 0  # id of the oldest row kept
        self._end = 0  # id of the next row
        self._dead = 0  # rows dropped out of order (stream DEAD) with id >= first
        self._max_ts = -inf
        self._lag = 0.0
        self._lists: list[Ids | None] = [None] * (self._key_mask + 1)
        self._fill = np.zeros(self._key_mask + 1, dtype=np.int64)
        self._alarms: Ids = np.zeros(64, dtype=np.int64)
        self._alarm_fill = 0
        self._streams: list[str] = []
        self._stream_index: dict[str, int] = {}
        self._events: list[str] = []
        self._event_index: dict[str, int] = {}
        self._write = threading.Lock()
        self._search = threading.Lock()

    # -- writing ---------------------------------------------------------------------------------

    def add(
        self, stream: str, ts: float, score: float, alarm: bool, event_id: str | None, word: int
    ) -> None:
        """Hot path, called for every scored window of recorded streams: amortised O(1), no
        per-call numpy allocation (append into preallocated chunks / growable arrays)."""
        self._check_word(word)
        with self._write:
            row = self._end
            if row - self._first > self._col.mask:
                self._col = self._col.regrow(self._first, row, 2 * (self._col.mask + 1))
            col, pos = self._col, row & self._col.mask
            col.stream[pos] = self._stream_id(stream)
            col.ts[pos] = ts
            col.score[pos] = score
            col.alarm[pos] = alarm
            col.event[pos] = -1 if event_id is None else self._event_id(event_id)
            col.word[pos] = word
            self._lag = max(self._lag, self._max_ts - ts)
            self._max_ts = max(self._max_ts, ts)
            self._push(word & self._key_mask, row)
            if alarm:
                if self._alarm_fill == len(self._alarms):
                    self._append_alarms(_NO_IDS)  # makes room
                self._alarms[self._alarm_fill] = row
                self._alarm_fill += 1
            self._end = row + 1

    def add_many(
        self,
        streams: Sequence[str],
        ts: np.ndarray,
        score: np.ndarray,
        alarm: np.ndarray,
        event_ids: Sequence[str | None],
        words: np.ndarray,
    ) -> None:
        """Bulk load (start-up from the recording: millions of rows in seconds)."""
        count = len(ts)
        if not len(streams) == len(score) == len(alarm) == len(event_ids) == len(words) == count:
            raise ValueError(
                "add_many: streams, ts, score, alarm, event_ids, words differ in length"
            )
        words = np.asarray(words, dtype=np.uint64)
        if count and int(words.max()) >> self.bits:
            raise ValueError(f"add_many: a word has more than {self.bits} bits")
        ts = np.asarray(ts, dtype=np.float64)
        alarm = np.asarray(alarm, dtype=bool)
        with self._write:
            first_new, end = self._end, self._end + count
            capacity = self._col.mask + 1
            while end - self._first > capacity:
                capacity *= 2
            if capacity > self._col.mask + 1:
                self._col = self._col.regrow(self._first, first_new, capacity)
            col, ids = self._col, np.arange(first_new, end, dtype=np.int64)
            pos = ids & col.mask
            col.stream[pos] = _codes(streams, self._stream_id)
            col.ts[pos], col.score[pos], col.alarm[pos] = ts, score, alarm
            col.event[pos] = _codes(event_ids, self._event_id)
            col.word[pos] = words
            if count:
                running = np.maximum.accumulate(np.concatenate([[self._max_ts], ts]))
                self._lag = max(self._lag, float(np.max(running[:-1] - ts)))
                self._max_ts = float(running[-1])
            keys = (words & np.uint64(self._key_mask)).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            bounds = np.flatnonzero(np.diff(keys[order])) + 1
            for chunk in np.split(order, bounds) if count else []:
                self._append(int(keys[chunk[0]]), ids[chunk])
            self._append_alarms(ids[alarm])
            self._end = end

    def _push(self, key: int, row: int) -> None:
        ids, fill = self._lists[key], int(self._fill[key])
        if ids is None or fill == len(ids):
            self._append(key, _NO_IDS)  # makes room
            ids, fill = self._lists[key], int(self._fill[key])
        assert ids is not None
        ids[fill] = row
        self._fill[key] = fill + 1

    def _append(self, key: int, ids: Ids) -> None:
        """Append ids to a key's list, first dropping its dead head when it is full."""
        old, fill = self._lists[key], int(self._fill[key])
        if old is None or fill + len(ids) >= len(old):
            live = (
                old[np.searchsorted(old[:fill], self._first) : fill] if old is not None else ids[:0]
            )
            new = np.empty(max(8, 2 * (len(live) + len(ids))), dtype=np.int64)
            new[: len(live)] = live
            self._lists[key], old, fill = new, new, len(live)
        old[fill : fill + len(ids)] = ids
        self._fill[key] = fill + len(ids)

    def _append_alarms(self, ids: Ids) -> None:
        fill = self._alarm_fill
        if fill + len(ids) >= len(self._alarms):
            live = self._alarms[np.searchsorted(self._alarms[:fill], self._first) : fill]
            grown = np.empty(max(64, 2 * (len(live) + len(ids))), dtype=np.int64)
            grown[: len(live)] = live
            self._alarms, fill = grown, len(live)
        self._alarms[fill : fill + len(ids)] = ids
        self._alarm_fill = fill + len(ids)

    def _stream_id(self, name: str) -> int:
        index = self._stream_index.get(name)
        if index is None:
            if len(self._streams) >= DEAD:
                raise ValueError(f"more than {DEAD} streams in one index")
            index = self._stream_index[name] = len(self._streams)
            self._streams.append(name)
        return index

    def _event_id(self, name: str | None) -> int:
        if name is None:
            return -1
        index = self._event_index.get(name)
        if index is None:
            index = self._event_index[name] = len(self._events)
            self._events.append(name)
        return index

    def _check_word(self, word: int) -> None:
        if not 0 <= word < (1 << self.bits):
            raise ValueError(f"word {word} does not fit in {self.bits} bits")

    # -- retention -------------------------------------------------------------------------------

    def drop_before(self, ts: float) -> int:
        """Drop rows older than `ts` (retention by age); returns rows dropped."""
        with self._search, self._write:
            col, dropped, start = self._col, 0, self._first
            while start < self._end:
                pos = np.arange(start, min(self._end, start + (1 << 20)), dtype=np.int64) & col.mask
                old = (col.ts[pos] < ts) & (col.stream[pos] != DEAD)
                col.stream[pos[old]] = DEAD
                dropped += int(old.sum())
                self._dead += int(old.sum())
                # Rows after this chunk are at most _lag older than its newest row.
                if float(col.ts[pos].max()) - self._lag >= ts:
                    break
                start += len(pos)
            self._advance_past_dead()
            return dropped

    def drop_oldest(self, n: int) -> int:
        """Drop the n oldest rows in insertion order (retention by size); returns rows dropped."""
        with self._search, self._write:
            dropped = 0
            while dropped < n and self._first < self._end:
                step = min(n - dropped, self._end - self._first)
                pos = np.arange(self._first, self._first + step, dtype=np.int64) & self._col.mask
                dead = int((self._col.stream[pos] == DEAD).sum())
                self._dead -= dead
                dropped += step - dead
                self._first += step
            self._advance_past_dead()
            return dropped

    def _advance_past_dead(self) -> None:
        col = self._col
        while self._first < self._end and col.stream[self._first & col.mask] == DEAD:
            self._first += 1
            self._dead -= 1

    def __len__(self) -> int:
        return self._end - self._first - self._dead

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays (row columns, key lists, alarm list)."""
        lists = sum(a.nbytes for a in self._lists if a is not None)
        pointers = 8 * len(self._lists)
        columns = sum(a.nbytes for a in self._col.arrays())
        return columns + lists + pointers + self._fill.nbytes + self._alarms.nbytes

    # -- searching -------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        with self._write:
            alarms = self._alarms[: self._alarm_fill]
            return _Snapshot(
                self._col, self._first, self._end, self._lag, list(self._lists),
                self._fill.copy(), alarms,
            )  # fmt: skip

    def nearest(
        self,
        word: int,
        k: int,
        *,
        exclude_stream: str | None = None,
        exclude_from_ts: float = -inf,
        exclude_to_ts: float = -inf,
        alarm_only: bool = False,
        max_distance: int | None = None,
    ) -> list[Hit]:
        """k nearest by Hamming distance, ties broken newest first; windows of `exclude_stream`
        with exclude_from_ts <= ts <= exclude_to_ts are skipped (the query's own neighbourhood)."""
        self._check_word(word)
        snap = self._snapshot()
        limit = self.bits if max_distance is None else max_distance
        stream = -1 if exclude_stream is None else self._stream_index.get(exclude_stream, -1)
        rule = _Filter(stream, exclude_from_ts, exclude_to_ts)
        if k <= 0 or limit < 0:
            return []
        if alarm_only:
            ids = _live(snap.alarms, snap.first)
            ids = ids[rule.keep(snap.col, ids & snap.col.mask)]
            dist = popcount(snap.col.word[ids & snap.col.mask] ^ snap.col.word.dtype.type(word))
            ids, dist = ids[dist <= limit], dist[dist <= limit]
            best = _top(snap.col, ids, dist, k)
            ids, dist = ids[best], dist[best]
        else:
            ids, dist = self._walk(snap, word, k, rule, limit)
        col, pos = snap.col, ids & snap.col.mask
        return [
            Hit(
                stream=self._streams[col.stream[p]],
                ts=float(col.ts[p]),
                distance=int(d),
                score=float(col.score[p]),
                alarm=bool(col.alarm[p]),
                event_id=self._events[col.event[p]] if col.event[p] >= 0 else None,
            )
            for p, d in zip(pos, dist, strict=True)
        ]

    def _walk(
        self, snap: _Snapshot, word: int, k: int, rule: _Filter, limit: int
    ) -> tuple[Ids, Ids]:
        """Keys radius by radius (nearest first) until k rows are nearer than the next radius."""
        col, exact = snap.col, self.bits <= KEY_BITS
        used = np.flatnonzero(snap.fill)
        key_dist = popcount(used ^ (word & self._key_mask))
        order = np.argsort(key_dist, kind="stable")
        used, key_dist = used[order], key_dist[order]
        starts = np.flatnonzero(np.diff(key_dist, prepend=-1))
        best_ids, best_dist = _NO_IDS, _NO_IDS
        high = word >> KEY_BITS
        for start, stop in zip(starts, [*starts[1:], len(used)], strict=False):
            radius = int(key_dist[start])
            if radius > limit or (len(best_ids) >= k and radius > best_dist[k - 1]):
                break
            found = []
            for key in used[start:stop]:
                ids = _live(snap.lists[key][: snap.fill[key]], snap.first)
                if exact and len(ids) > _SMALL:
                    ids = _newest(snap, ids, k, rule)
                found.append(ids)
            ids = np.concatenate(found)
            ids = ids[rule.keep(col, ids & col.mask)]
            if exact:
                dist = np.full(len(ids), radius, dtype=np.int64)
            else:
                rest = (col.word[ids & col.mask] >> KEY_BITS) ^ col.word.dtype.type(high)
                dist = radius + popcount(rest)
                ids, dist = ids[dist <= limit], dist[dist <= limit]
            ids, dist = np.concatenate([best_ids, ids]), np.concatenate([best_dist, dist])
            best = _top(col, ids, dist, k)
            best_ids, best_dist = ids[best], dist[best]
        return best_ids, best_dist

    def nearest_events(
        self, word: int, n: int, *, max_distance: int, exclude_event: str | None = None
    ) -> list[EventHit]:
        """The n past alarm episodes nearest to `word` (distance = min over each event's
        windows), within max_distance, nearest first."""
        self._check_word(word)
        snap = self._snapshot()
        col = snap.col
        ids = _live(snap.alarms, snap.first)
        pos = ids & col.mask
        event = col.event[pos]
        dist = popcount(col.word[pos] ^ col.word.dtype.type(word))
        keep = (event >= 0) & (col.stream[pos] != DEAD) & (dist <= max_distance)
        if exclude_event is not None and exclude_event in self._event_index:
            keep &= event != self._event_index[exclude_event]
        ids, pos, event, dist = ids[keep], pos[keep], event[keep], dist[keep]
        ts = col.ts[pos]
        # Each event's nearest window (newest among equals), then events nearest first.
        order = np.lexsort((-ids, -ts, dist, event))
        firsts = order[np.flatnonzero(np.diff(event[order], prepend=-2))]
        firsts = firsts[np.lexsort((-ids[firsts], -ts[firsts], dist[firsts]))][: max(n, 0)]
        return [
            EventHit(
                event_id=self._events[event[i]],
                stream=self._streams[col.stream[pos[i]]],
                ts=float(ts[i]),
                distance=int(dist[i]),
            )
            for i in firsts
        ]


def _live(ids: Ids, first: int) -> Ids:
    """The ids not yet dropped from an ascending id list."""
    return ids[np.searchsorted(ids, first) :]


def _newest(snap: _Snapshot, ids: Ids, k: int, rule: _Filter) -> Ids:
    """The ids passing `rule` that may be among the k newest, read from the end of `ids`."""
    col, take = snap.col, min(len(ids), 4 * k + 64)
    while True:
        tail = ids[len(ids) - take :]
        ts = col.ts[tail & col.mask]
        keep = rule.keep(col, tail & col.mask)
        if take == len(ids):
            return tail[keep]
        if keep.sum() >= k:
            kth = np.partition(ts[keep], -k)[-k]
            # A row before the tail is at most _lag newer than any row in it.
            if kth >= ts.min() + snap.lag:
                return tail[keep]
        take = min(len(ids), 8 * take)


def _top(col: _Column, ids: Ids, dist: Ids, k: int) -> Ids:
    """Indices of the k best rows: nearest, then newest, then last added, in that order."""
    chosen = np.arange(len(ids))
    if len(ids) > 4 * k + 64:
        kth = np.partition(dist, k - 1)[k - 1]
        chosen = np.flatnonzero(dist <= kth)
        if len(chosen) > 4 * k + 64:  # many tie at the k-th distance: keep the newest of those
            tied = chosen[dist[chosen] == kth]
            nearer = chosen[dist[chosen] < kth]
            ts = col.ts[ids[tied] & col.mask]
            need = k - len(nearer)
            tied = tied[ts >= np.partition(ts, -need)[-need]]
            chosen = np.concatenate([nearer, tied])
    ts = col.ts[ids[chosen] & col.mask]
    return chosen[np.lexsort((-ids[chosen], -ts, dist[chosen]))[:k]]


def _codes(names: Sequence[str | None], index_of: Any) -> npt.NDArray[np.int64]:
    """Name -> index per row (None -> -1), one dictionary look-up per distinct name."""
    table: dict[str | None, int] = {None: -1}
    out = np.empty(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        code = table.get(name)
        if code is None:
            code = table[name] = int(index_of(name))
        out[row] = code
    return out
