"""The similar-window index (daemon/hashindex.py) against a brute-force reference."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from math import inf

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.hashindex import CodeIndex, EventHit, Hit, hash_bits, popcount
from daemon.request import bits_to_hex


@dataclass
class Row:
    order: int  # insertion order: the last tie-break
    stream: str
    ts: float
    score: float
    alarm: bool
    event_id: str | None
    word: int


class Reference:
    """Every row in a list; every query a sort of the whole list."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def nearest(
        self,
        word: int,
        k: int,
        exclude_stream: str | None = None,
        exclude_from_ts: float = -inf,
        exclude_to_ts: float = -inf,
        alarm_only: bool = False,
        max_distance: int | None = None,
    ) -> list[Hit]:
        found = []
        for r in self.rows:
            d = (r.word ^ word).bit_count()
            own = r.stream == exclude_stream and exclude_from_ts <= r.ts <= exclude_to_ts
            if own or (alarm_only and not r.alarm):
                continue
            if max_distance is None or d <= max_distance:
                found.append((d, -r.ts, -r.order, r))
        found.sort(key=lambda f: f[:3])
        return [Hit(r.stream, r.ts, d, r.score, r.alarm, r.event_id) for d, _, _, r in found[:k]]

    def nearest_events(
        self, word: int, n: int, max_distance: int, exclude_event: str | None = None
    ) -> list[EventHit]:
        best: dict[str, tuple[int, float, int, Row]] = {}
        for r in self.rows:
            d = (r.word ^ word).bit_count()
            if not r.alarm or r.event_id is None or r.event_id == exclude_event or d > max_distance:
                continue
            key = (d, -r.ts, -r.order, r)
            if r.event_id not in best or key[:3] < best[r.event_id][:3]:
                best[r.event_id] = key
        ranked = sorted(best.values(), key=lambda f: f[:3])[:n]
        return [EventHit(r.event_id or "", r.stream, r.ts, d) for d, _, _, r in ranked]


def random_rows(rng: np.random.Generator, count: int, bits: int, start: int = 0) -> list[Row]:
    """Rows like a recording: a few dominant words, rare others; times nearly in order."""
    common = rng.integers(0, 1 << bits, size=3, dtype=np.uint64)
    rows = []
    for i in range(count):
        if rng.random() < 0.8:
            word = int(common[rng.integers(0, 3)])
        else:
            word = int(rng.integers(0, 1 << bits, dtype=np.uint64))
        alarm = bool(rng.random() < 0.2)
        event = f"ev{rng.integers(0, 6)}" if alarm and rng.random() < 0.9 else None
        ts = float(start + i) - float(rng.integers(0, 30)) * (rng.random() < 0.1)  # some late
        if rng.random() < 0.05:
            ts = float(start + i - 1)  # equal times: ties broken by insertion order
        stream = f"s{rng.integers(0, 4)}"
        rows.append(Row(start + i, stream, ts, float(rng.random()), alarm, event, word))
    return rows


def load(index: CodeIndex, ref: Reference, rows: list[Row], bulk: bool) -> None:
    if bulk:
        index.add_many(
            [r.stream for r in rows],
            np.array([r.ts for r in rows]),
            np.array([r.score for r in rows], dtype=np.float32),
            np.array([r.alarm for r in rows]),
            [r.event_id for r in rows],
            np.array([r.word for r in rows], dtype=np.uint64),
        )
    else:
        for r in rows:
            index.add(r.stream, r.ts, r.score, r.alarm, r.event_id, r.word)
    for r in rows:  # the index stores scores as float32
        r.score = float(np.float32(r.score))
    ref.rows.extend(rows)


def assert_same_answers(index: CodeIndex, ref: Reference, rng: np.random.Generator) -> None:
    bits = index.bits
    words = [r.word for r in ref.rows[-5:]] + [int(rng.integers(0, 1 << bits, dtype=np.uint64))]
    for word in words:
        for k in (1, 3, 10, 400):
            assert index.nearest(word, k) == ref.nearest(word, k)
        assert index.nearest(word, 5, alarm_only=True) == ref.nearest(word, 5, alarm_only=True)
        ts = ref.rows[len(ref.rows) // 2].ts if ref.rows else 0.0
        skip = {"exclude_stream": "s1", "exclude_from_ts": ts - 100, "exclude_to_ts": ts + 100}
        assert index.nearest(word, 10, **skip) == ref.nearest(word, 10, **skip)
        both = {**skip, "alarm_only": True, "max_distance": bits // 3}
        assert index.nearest(word, 10, **both) == ref.nearest(word, 10, **both)
        near = {"max_distance": bits // 4}
        assert index.nearest(word, 50, **near) == ref.nearest(word, 50, **near)
        for limit in (0, bits // 3, bits):
            got = index.nearest_events(word, 4, max_distance=limit, exclude_event="ev2")
            assert got == ref.nearest_events(word, 4, limit, "ev2")
    assert len(index) == len(ref.rows)


@pytest.mark.parametrize("bits", [4, 12, 16, 20, 40, 64])
@pytest.mark.parametrize("bulk", [False, True])
def test_searches_equal_brute_force_through_adds_and_retention(bits: int, bulk: bool) -> None:
    rng = np.random.default_rng(bits * 2 + bulk)
    index, ref = CodeIndex(bits), Reference()
    load(index, ref, random_rows(rng, 1500, bits), bulk)  # lists well past the short-list size
    assert_same_answers(index, ref, rng)
    assert index.drop_oldest(200) == 200
    ref.rows = ref.rows[200:]
    assert_same_answers(index, ref, rng)
    cutoff = ref.rows[400].ts
    dropped = index.drop_before(cutoff)
    kept = [r for r in ref.rows if r.ts >= cutoff]
    assert dropped == len(ref.rows) - len(kept)
    ref.rows = kept
    assert_same_answers(index, ref, rng)
    load(index, ref, random_rows(rng, 3000, bits, start=1500), bulk)  # grows and wraps the ring
    assert_same_answers(index, ref, rng)
    assert index.drop_oldest(10**6) == len(ref.rows)
    ref.rows = []
    assert_same_answers(index, ref, rng)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(0, 400),
    drop=st.integers(0, 60),
)
def test_any_small_history_answers_like_brute_force(
    bits: int, seed: int, count: int, drop: int
) -> None:
    rng = np.random.default_rng(seed)
    index, ref = CodeIndex(bits), Reference()
    load(index, ref, random_rows(rng, count, bits), bulk=bool(seed % 2))
    index.drop_oldest(drop)
    ref.rows = ref.rows[drop:]
    assert_same_answers(index, ref, rng)


def test_late_rows_are_found_newest_first_in_a_long_list() -> None:
    index, ref = CodeIndex(16), Reference()
    rows = [Row(i, "a", float(i), 0.0, False, None, 7) for i in range(5000)]
    rows[100].ts = 10_000.0  # added early, yet the newest: must beat the 4,999 after it
    load(index, ref, rows, bulk=False)
    assert index.nearest(7, 1)[0].ts == 10_000.0
    assert index.nearest(7, 3) == ref.nearest(7, 3)


def test_hash_bits_read_like_the_hash_ops_hex_unit_0_most_significant() -> None:
    rng = np.random.default_rng(0)
    code = rng.random((50, 13))
    cut = rng.random(13)
    words = hash_bits(code, cut)
    assert words.dtype == np.uint64
    for row, word in zip(code, words, strict=True):
        assert int(word) == sum(1 << (12 - i) for i in range(13) if row[i] > cut[i])
        assert int(word) == int(bits_to_hex(row > cut), 16)
    full = hash_bits(np.ones((2, 64)), np.zeros(64))
    assert int(full[0]) == 2**64 - 1
    assert popcount(full).tolist() == [64, 64]


@pytest.mark.parametrize("units", [0, 65])
def test_hash_bits_refuses_codes_that_do_not_fit_a_word(units: int) -> None:
    with pytest.raises(ValueError, match="1 to 64 bits"):
        hash_bits(np.zeros((2, units)), np.zeros(units))


def test_words_wider_than_the_index_are_refused() -> None:
    index = CodeIndex(8)
    with pytest.raises(ValueError, match="8 bits"):
        index.add("a", 0.0, 0.0, False, None, 256)
    with pytest.raises(ValueError, match="8 bits"):
        index.nearest(-1, 1)


def test_memory_grows_with_rows_and_is_stated_per_row() -> None:
    index = CodeIndex(16)
    empty = index.nbytes
    rng = np.random.default_rng(1)
    count = 100_000
    index.add_many(
        ["a"] * count,
        np.arange(count, dtype=np.float64),
        np.zeros(count, dtype=np.float32),
        np.zeros(count, dtype=bool),
        [None] * count,
        rng.integers(0, 50, count, dtype=np.uint64),
    )
    assert len(index) == count
    per_row = (index.nbytes - empty) / count
    assert 20 < per_row < 64  # columns (21 B) + key list (8 B), plus growth slack below 2x


def test_searches_while_one_writer_adds_see_only_whole_rows() -> None:
    index = CodeIndex(16)
    stop, errors = threading.Event(), []

    def search() -> None:
        while not stop.is_set():
            for hit in index.nearest(5, 10):
                if hit.score != hit.ts * 2 or hit.distance != (5 ^ int(hit.ts) % 64).bit_count():
                    errors.append(hit)

    readers = [threading.Thread(target=search) for _ in range(2)]
    for reader in readers:
        reader.start()
    for i in range(20_000):
        index.add("a", float(i), float(2 * i), False, None, i % 64)
        if i % 5000 == 4999:
            index.drop_oldest(1000)
    stop.set()
    for reader in readers:
        reader.join()
    assert errors == []
    assert len(index) == 20_000 - 4 * 1000


def test_room_made_up_front_is_used_before_any_growth() -> None:
    rng = np.random.default_rng(7)
    index, ref = CodeIndex(16, capacity=3000), Reference()
    before = index.nbytes
    columns = 4096 * (2 + 8 + 4 + 1 + 4 + 2)  # the ring: 3000 rounded up to a power of two
    assert before >= columns
    load(index, ref, random_rows(rng, 2500, 16), bulk=False)
    lists = index.nbytes - before  # only the key lists grew
    assert lists < 64 * 2500
    assert_same_answers(index, ref, rng)
