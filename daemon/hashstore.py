"""The rows behind the similar-window index: a growable ring of columns and one id list per key.

Rows (stream, time, score, alarm, event, code word) sit in columns of a ring whose capacity is a
power of two: a row's id only grows, its slot is `id & mask`, so dropping the oldest rows only
moves `first`. Beside the rows, every key (the word when it has <= 16 bits, else its low 16
bits) lists the ids of its rows in insertion order; the alarm windows are listed once more with
their words and events beside them (contiguous, for brute-force scans that do not touch the
ring). A list drops its dead head when it next grows. Per row: stream 2 B, time 8, score 4, alarm 1,
event 4, word 1-8 (narrowest dtype), id in a key list 8, plus the slack of growth (< 2x).

Threads: one writer adds; searches read a `Snapshot`. `add` holds `_write` for microseconds,
except when the ring doubles (a copy of every row: give `capacity` up front to avoid it);
`reading()` holds `_search` for the whole search but `_write` only to copy references and
lengths (under 0.5 ms with all 65,536 keys in use). The writer only writes beyond those
lengths (or into slots of rows dropped before the search began), and a growth swaps in new
arrays, leaving the old ones intact for the reader. Retention holds both locks, so it may wait
behind a search; `add` never does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import inf
from typing import Any

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int64]
KEY_BITS = 16
DEAD = 0xFFFF  # stream index of a row dropped out of insertion order (drop_before)
NO_IDS: Ids = np.zeros(0, dtype=np.int64)
_CHUNK = 1 << 16  # rows looked at per step by retention


def word_dtype(bits: int) -> type[np.unsignedinteger[Any]]:
    """The narrowest unsigned dtype that holds a word of `bits` bits (1 to 64)."""
    widths = ((8, np.uint8), (16, np.uint16), (32, np.uint32), (64, np.uint64))
    for width, dtype in widths:
        if 1 <= bits <= width:
            return dtype
    raise ValueError(f"bits must be 1 to 64, got {bits}")


class Columns:
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

    def regrow(self, first: int, end: int, capacity: int) -> Columns:
        """A new ring of `capacity` slots holding rows first..end-1 (this one stays intact)."""
        grown = Columns(capacity, self.word.dtype.type)
        ids = np.arange(first, end, dtype=np.int64)
        for new, old in zip(grown.arrays(), self.arrays(), strict=True):
            new[ids & grown.mask] = old[ids & self.mask]
        return grown


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a search reads: rows first..end-1 and the key lists as they were."""

    col: Columns
    first: int
    end: int
    lag: float  # a row is at most this much newer (in ts) than any row added after it
    lists: list[Ids | None]
    fill: Ids
    alarms: tuple[Ids, np.ndarray, npt.NDArray[np.int32]]  # ids, words, events (all added)

    def ids(self, key: int) -> Ids:
        """The live ids of a key's list, ascending."""
        ids = self.lists[key]
        if ids is None:
            return NO_IDS
        ids = ids[: self.fill[key]]
        return ids[np.searchsorted(ids, self.first) :]

    def alarm_rows(self) -> tuple[Ids, np.ndarray, npt.NDArray[np.int32]]:
        """The live alarm windows: ids (ascending), words, event indices."""
        ids, words, events = self.alarms
        low = int(np.searchsorted(ids, self.first))
        return ids[low:], words[low:], events[low:]


class AlarmList:
    """Ids of the alarm windows with their words and events, in growable arrays."""

    def __init__(self, word: type[np.unsignedinteger[Any]]) -> None:
        self.ids: Ids = np.empty(64, dtype=np.int64)
        self.words = np.empty(64, dtype=word)
        self.events = np.empty(64, dtype=np.int32)
        self.fill = 0

    def append(self, ids: Ids, words: np.ndarray, events: np.ndarray, first: int) -> None:
        """Append rows; when full, copy into larger arrays without the rows before `first`."""
        fill = self.fill
        if fill + len(ids) >= len(self.ids):
            low = int(np.searchsorted(self.ids[:fill], first))
            size = max(64, 2 * (fill - low + len(ids)))
            # A list typed as arrays: a tuple of three dtypes joins to `object` in some mypy runs.
            olds: list[np.ndarray] = [self.ids, self.words, self.events]
            grown = [np.empty(size, dtype=a.dtype) for a in olds]
            for new, old in zip(grown, olds, strict=True):
                new[: fill - low] = old[low:fill]
            self.ids, self.words, self.events = grown
            fill -= low
        self.ids[fill : fill + len(ids)] = ids
        self.words[fill : fill + len(ids)] = words
        self.events[fill : fill + len(ids)] = events
        self.fill = fill + len(ids)

    def push(self, row: int, word: int, event: int, first: int) -> None:
        """Append one row without allocating (unless the arrays grow)."""
        if self.fill + 1 >= len(self.ids):
            self.append(NO_IDS, NO_IDS, NO_IDS, first)  # makes room
        fill = self.fill
        self.ids[fill], self.words[fill], self.events[fill] = row, word, event
        self.fill = fill + 1

    def view(self) -> tuple[Ids, np.ndarray, npt.NDArray[np.int32]]:
        fill = self.fill
        return self.ids[:fill], self.words[:fill], self.events[:fill]

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.words.nbytes + self.events.nbytes


class Names:
    """Strings stored once, rows holding their index."""

    def __init__(self, limit: int) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._limit = limit

    def index(self, name: str | None) -> int:
        """The index of `name`, added if new; None -> -1."""
        if name is None:
            return -1
        found = self._index.get(name)
        if found is None:
            if len(self.names) >= self._limit:
                raise ValueError(f"more than {self._limit} distinct names")
            found = self._index[name] = len(self.names)
            self.names.append(name)
        return found

    def find(self, name: str | None) -> int:
        """The index of a known name; -1 for None or an unknown name."""
        return -1 if name is None else self._index.get(name, -1)

    def indices(self, names: Sequence[str | None]) -> npt.NDArray[np.int64]:
        """Index per name, one dictionary look-up per row."""
        table: dict[str | None, int] = {}
        out = np.empty(len(names), dtype=np.int64)
        for row, name in enumerate(names):
            found = table.get(name)
            if found is None:
                found = table[name] = self.index(name)
            out[row] = found
        return out


class RowStore:
    """Rows added in time order (roughly), dropped oldest first, read through snapshots."""

    def __init__(self, bits: int, capacity: int = 1024) -> None:
        self.key_mask = (1 << min(bits, KEY_BITS)) - 1
        self.streams = Names(DEAD)
        self.events = Names(2**31 - 1)
        self._col = Columns(1 << max(10, (capacity - 1).bit_length()), word_dtype(bits))
        self._first = 0  # id of the oldest row kept
        self._end = 0  # id of the next row
        self._dead = 0  # rows dropped out of order (stream DEAD) with id >= first
        self._max_ts = -inf
        self._lag = 0.0
        self._lists: list[Ids | None] = [None] * (self.key_mask + 1)
        self._fill = np.zeros(self.key_mask + 1, dtype=np.int64)
        self._alarms = AlarmList(word_dtype(bits))
        self._write = threading.Lock()
        self._search = threading.Lock()

    def add(
        self, stream: str, ts: float, score: float, alarm: bool, event: str | None, word: int
    ) -> None:
        """Append one row: scalar writes, arrays grow by doubling."""
        with self._write:
            row = self._end
            if row - self._first > self._col.mask:
                self._col = self._col.regrow(self._first, row, 2 * (self._col.mask + 1))
            col, pos = self._col, row & self._col.mask
            col.stream[pos] = self.streams.index(stream)
            col.ts[pos], col.score[pos], col.alarm[pos] = ts, score, alarm
            col.event[pos] = event_index = self.events.index(event)
            col.word[pos] = word
            self._lag = max(self._lag, self._max_ts - ts)
            self._max_ts = max(self._max_ts, ts)
            self._push(word & self.key_mask, row)
            if alarm:
                self._alarms.push(row, word, event_index, self._first)
            self._end = row + 1

    def add_many(
        self,
        streams: Sequence[str],
        ts: npt.NDArray[np.float64],
        score: np.ndarray,
        alarm: npt.NDArray[np.bool_],
        events: Sequence[str | None],
        words: npt.NDArray[np.uint64],
    ) -> None:
        """Append rows in bulk (in the order they were added the first time)."""
        with self._write:
            first_new, end = self._end, self._end + len(ts)
            capacity = self._col.mask + 1
            while end - self._first > capacity:
                capacity *= 2
            if capacity > self._col.mask + 1:
                self._col = self._col.regrow(self._first, first_new, capacity)
            col, ids = self._col, np.arange(first_new, end, dtype=np.int64)
            pos = ids & col.mask
            col.stream[pos] = self.streams.indices(streams)
            col.ts[pos], col.score[pos], col.alarm[pos] = ts, score, alarm
            col.event[pos] = self.events.indices(events)
            col.word[pos] = words
            if len(ts):
                running = np.maximum.accumulate(np.concatenate([[self._max_ts], ts]))
                self._lag = max(self._lag, float(np.max(running[:-1] - ts)))
                self._max_ts = float(running[-1])
            keys = (words & np.uint64(self.key_mask)).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            for chunk in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
                if len(chunk):
                    self._append(int(keys[chunk[0]]), ids[chunk])
            self._alarms.append(ids[alarm], words[alarm], col.event[pos[alarm]], self._first)
            self._end = end

    def _push(self, key: int, row: int) -> None:
        ids, fill = self._lists[key], int(self._fill[key])
        if ids is None or fill == len(ids):
            self._append(key, NO_IDS)  # makes room
            ids, fill = self._lists[key], int(self._fill[key])
        assert ids is not None
        ids[fill] = row
        self._fill[key] = fill + 1

    def _append(self, key: int, ids: Ids) -> None:
        """Append ids to a key's list; a full list is copied without its dropped head."""
        old, fill = self._lists[key], int(self._fill[key])
        if old is None or fill + len(ids) >= len(old):
            live = NO_IDS if old is None else old[np.searchsorted(old[:fill], self._first) : fill]
            new = np.empty(max(8, 2 * (len(live) + len(ids))), dtype=np.int64)
            new[: len(live)] = live
            self._lists[key], old, fill = new, new, len(live)
        old[fill : fill + len(ids)] = ids
        self._fill[key] = fill + len(ids)

    def drop_before(self, ts: float) -> int:
        """Drop rows older than `ts`; returns rows dropped."""
        with self._search, self._write:
            col, dropped, start = self._col, 0, self._first
            while start < self._end:
                pos = np.arange(start, min(self._end, start + _CHUNK), dtype=np.int64) & col.mask
                old = (col.ts[pos] < ts) & (col.stream[pos] != DEAD)
                col.stream[pos[old]] = DEAD
                dropped += int(old.sum())
                # Rows after this chunk are at most _lag older than its newest row.
                if float(col.ts[pos].max()) - self._lag >= ts:
                    break
                start += len(pos)
            self._dead += dropped
            self._skip_dead()
            return dropped

    def drop_oldest(self, n: int) -> int:
        """Drop the n oldest rows in insertion order; returns rows dropped."""
        with self._search, self._write:
            dropped = 0
            while dropped < n and self._first < self._end:
                step = min(n - dropped, self._end - self._first)
                pos = np.arange(self._first, self._first + step, dtype=np.int64) & self._col.mask
                dead = int((self._col.stream[pos] == DEAD).sum())
                self._dead -= dead
                dropped += step - dead
                self._first += step
            self._skip_dead()
            return dropped

    def _skip_dead(self) -> None:
        """Move `first` past rows already dropped out of order."""
        col = self._col
        while self._first < self._end:
            pos = np.arange(self._first, min(self._end, self._first + _CHUNK)) & col.mask
            live = np.flatnonzero(col.stream[pos] != DEAD)
            skip = int(live[0]) if len(live) else len(pos)
            self._first += skip
            self._dead -= skip
            if len(live):
                return

    def __len__(self) -> int:
        return self._end - self._first - self._dead

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (columns, key lists with their slack, list pointers)."""
        lists = sum(a.nbytes for a in self._lists if a is not None)
        columns = sum(a.nbytes for a in self._col.arrays())
        pointers = 8 * len(self._lists) + self._fill.nbytes
        return columns + lists + pointers + self._alarms.nbytes

    @contextmanager
    def reading(self) -> Iterator[Snapshot]:
        """A snapshot to search, with retention held off until the search ends."""
        with self._search:
            with self._write:
                snap = Snapshot(
                    self._col, self._first, self._end, self._lag, list(self._lists),
                    self._fill.copy(), self._alarms.view(),
                )  # fmt: skip
            yield snap
