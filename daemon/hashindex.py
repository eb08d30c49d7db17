"""Similar-window search: the hash code of every recorded window, searched by Hamming distance.

The rows live in `daemon.hashstore.RowStore` (one id list per key: the word when it has <= 16
bits, else its low 16 bits; memory per row and thread safety are described there). Codes of
normal operation fill few keys, so a search computes the distance to every used key (at most
65,536, one vectorised popcount), then walks the keys radius by radius and stops once k rows
are nearer than the next radius. Within a long list the newest rows are read from its end: the
store's `lag` bounds how much newer an earlier row can be, so such a list is rarely read whole.
Alarm windows (a few per cent of rows) are searched by brute force: `alarm_only`, events.
Wider words add the popcount of their high bits to the key's distance, row by row.

Threads: one writer calls `add` / `add_many`, searches run in other threads; `add` never waits
behind a search (see hashstore).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from math import inf
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.hashstore import DEAD, KEY_BITS, NO_IDS, Columns, Ids, RowStore, Snapshot

_SMALL = 256  # a key's list up to this length is read whole, longer ones from the end
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
    """[B, K] codes -> [B] uint64 words of K bits: code unit 0 is the most significant, as the
    `hash` op's hex writes them (`request.bits_to_hex`). K <= 64 (else ValueError)."""
    code = np.asarray(code)
    if code.ndim != 2:
        raise ValueError(f"code must be [batch, units], got shape {code.shape}")
    units = code.shape[1]
    if not 1 <= units <= 64:
        raise ValueError(f"code has {units} units; a hash word holds 1 to 64 bits")
    bits = np.zeros((code.shape[0], 64), dtype=bool)
    bits[:, 64 - units :] = code > np.asarray(cut).reshape(1, units)
    packed = np.packbits(bits, axis=1, bitorder="big")
    return np.ascontiguousarray(packed).view(">u8").reshape(-1).astype(np.uint64)


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


@dataclass(frozen=True, slots=True)
class _Filter:
    stream: int  # -1: no exclusion
    from_ts: float
    to_ts: float

    def keep(self, col: Columns, pos: Ids) -> npt.NDArray[np.bool_]:
        stream = col.stream[pos]
        keep: npt.NDArray[np.bool_] = stream != DEAD
        if self.stream >= 0:
            ts = col.ts[pos]
            keep &= (stream != self.stream) | (ts < self.from_ts) | (ts > self.to_ts)
        return keep


class CodeIndex:
    """Hash codes of past windows, searched for the nearest by Hamming distance."""

    def __init__(self, bits: int, capacity: int = 1024) -> None:
        """An empty index of `bits`-bit words; `capacity`: rows to make room for up front (the
        row columns double when full, copying every row once)."""
        self.bits = bits
        self._rows = RowStore(bits, capacity)

    def add(
        self, stream: str, ts: float, score: float, alarm: bool, event_id: str | None, word: int
    ) -> None:
        """Hot path, called for every scored window of recorded streams: amortised O(1), no
        per-call numpy allocation (append into preallocated chunks / growable arrays)."""
        self._check_word(word)
        self._rows.add(stream, ts, score, alarm, event_id, word)

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
        self._rows.add_many(
            streams,
            np.asarray(ts, dtype=np.float64),
            np.asarray(score, dtype=np.float32),
            np.asarray(alarm, dtype=bool),
            event_ids,
            words,
        )

    def drop_before(self, ts: float) -> int:
        """Drop windows older than `ts` (retention by age); returns rows dropped."""
        return self._rows.drop_before(ts)

    def drop_oldest(self, n: int) -> int:
        """Drop the n oldest windows in order added (retention by size); returns rows dropped."""
        return self._rows.drop_oldest(n)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays."""
        return self._rows.nbytes

    def _check_word(self, word: int) -> None:
        if not 0 <= word < (1 << self.bits):
            raise ValueError(f"word {word} does not fit in {self.bits} bits")

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
        limit = self.bits if max_distance is None else max_distance
        stream = self._rows.streams.find(exclude_stream)
        rule = _Filter(stream, exclude_from_ts, exclude_to_ts)
        if k <= 0 or limit < 0:
            return []
        with self._rows.reading() as snap:
            if alarm_only:
                ids, dist = self._scan(snap, snap.alarm_rows()[0], word, rule, limit)
                best = _top(snap.col, ids, dist, k)
                ids, dist = ids[best], dist[best]
            else:
                ids, dist = self._walk(snap, word, k, rule, limit)
            col, pos = snap.col, ids & snap.col.mask
            streams, events = self._rows.streams.names, self._rows.events.names
            return [
                Hit(
                    stream=streams[col.stream[p]],
                    ts=float(col.ts[p]),
                    distance=int(d),
                    score=float(col.score[p]),
                    alarm=bool(col.alarm[p]),
                    event_id=events[col.event[p]] if col.event[p] >= 0 else None,
                )
                for p, d in zip(pos, dist, strict=True)
            ]

    @staticmethod
    def _scan(snap: Snapshot, ids: Ids, word: int, rule: _Filter, limit: int) -> tuple[Ids, Ids]:
        """Brute force: the ids passing `rule` within `limit` of `word`, and their distances."""
        col = snap.col
        ids = ids[rule.keep(col, ids & col.mask)]
        dist = popcount(col.word[ids & col.mask] ^ col.word.dtype.type(word))
        return ids[dist <= limit], dist[dist <= limit]

    def _walk(
        self, snap: Snapshot, word: int, k: int, rule: _Filter, limit: int
    ) -> tuple[Ids, Ids]:
        """Keys radius by radius (nearest first) until k rows are nearer than the next radius."""
        col, exact = snap.col, self.bits <= KEY_BITS
        used = np.flatnonzero(snap.fill)
        key_dist = popcount(used ^ (word & self._rows.key_mask))
        order = np.argsort(key_dist, kind="stable")
        used, key_dist = used[order], key_dist[order]
        starts = np.flatnonzero(np.diff(key_dist, prepend=-1))
        best_ids, best_dist = NO_IDS, NO_IDS
        high = word >> KEY_BITS
        for start, stop in zip(starts, [*starts[1:], len(used)], strict=False):
            radius = int(key_dist[start])
            if radius > limit or (len(best_ids) >= k and radius > best_dist[k - 1]):
                break
            found = []
            for key in used[start:stop]:
                ids = snap.ids(key)
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
        with self._rows.reading() as snap:
            col, (ids, words, event) = snap.col, snap.alarm_rows()
            dist = popcount(words ^ words.dtype.type(word))
            keep = (event >= 0) & (dist <= max_distance)
            if exclude_event is not None:
                keep &= event != self._rows.events.find(exclude_event)
            ids, event, dist = ids[keep], event[keep], dist[keep]
            pos = ids & col.mask
            alive = col.stream[pos] != DEAD  # the ring is read only for the rows within reach
            ids, pos, event, dist = ids[alive], pos[alive], event[alive], dist[alive]
            best = _per_event(col, ids, pos, event, dist, n)
            ts, stream = col.ts[pos[best]], col.stream[pos[best]]
        events, streams = self._rows.events.names, self._rows.streams.names
        return [
            EventHit(events[event[i]], streams[s], float(t), int(dist[i]))
            for i, s, t in zip(best, stream, ts, strict=True)
        ]

    def word_at(self, stream: str, ts: float) -> int | None:
        """The word of `stream`'s window nearest in time to `ts`; None if it has none.

        A scan of the stream column in chunks (no per-stream time index): ~0.1 s per 10 M rows,
        for `similar` queries that name a stream and a time."""
        sid = self._rows.streams.find(stream)
        if sid < 0:
            return None
        best, best_gap = None, inf
        with self._rows.reading() as snap:
            col = snap.col
            for start in range(snap.first, snap.end, 1 << 20):
                pos = np.arange(start, min(snap.end, start + (1 << 20))) & col.mask
                mine = pos[col.stream[pos] == sid]
                if not len(mine):
                    continue
                gaps = np.abs(col.ts[mine] - ts)
                i = int(np.argmin(gaps))
                if gaps[i] < best_gap:
                    best, best_gap = int(col.word[mine[i]]), float(gaps[i])
        return best


def _per_event(col: Columns, ids: Ids, pos: Ids, event: npt.NDArray[Any], dist: Ids, n: int) -> Ids:
    """Indices of the n nearest events' best windows (nearest, then newest), nearest first:
    distance by distance, so only the rows up to the n-th event's distance are sorted."""
    order = np.argsort(dist.astype(np.uint8), kind="stable")  # a radix sort
    bounds = np.searchsorted(dist[order], np.arange(int(dist.max(initial=0)) + 2))
    found: list[Ids] = []
    seen = np.zeros(0, dtype=event.dtype)
    for low, high in pairwise(bounds):
        if sum(len(f) for f in found) >= n:
            break
        group = order[low:high]
        group = group[~np.isin(event[group], seen)]
        if not len(group):
            continue
        firsts = _newest_per_event(col, pos, event, group)
        found.append(firsts)
        seen = np.concatenate([seen, event[firsts]])
    chosen = np.concatenate(found) if found else NO_IDS
    ts = col.ts[pos[chosen]]
    return chosen[np.lexsort((-ids[chosen], -ts, dist[chosen]))][: max(n, 0)]


def _newest_per_event(col: Columns, pos: Ids, event: npt.NDArray[Any], group: Ids) -> Ids:
    """Of the rows `group` (ascending ids), each event's newest (then last added): linear, as
    an event's rows are mostly consecutive, which the stable sort's runs exploit."""
    group = group[np.argsort(event[group], kind="stable")]  # ids stay ascending per event
    starts = np.flatnonzero(np.diff(event[group], prepend=-2))
    ts = col.ts[pos[group]]
    newest = np.repeat(np.maximum.reduceat(ts, starts), np.diff(np.append(starts, len(group))))
    last = np.where(ts == newest, np.arange(len(group)), -1)
    return group[np.maximum.reduceat(last, starts)]


def _newest(snap: Snapshot, ids: Ids, k: int, rule: _Filter) -> Ids:
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


def _top(col: Columns, ids: Ids, dist: Ids, k: int) -> Ids:
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
