"""Does the similar-window index find a fault's earlier occurrences? precision@1 of repeated
faults' episodes, and how well Hamming neighbours agree with Euclidean ones (recall@10)."""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon.hashindex import CodeIndex, hash_bits
from training.bench.signature import Episode, Stream, event_ids

QUERIES = ("start", "peak", "first5")


def code_words(code: np.ndarray, cut: np.ndarray, bits: int) -> np.ndarray:
    """Hash words of the first `bits` code units."""
    return hash_bits(code[:, :bits], cut[:bits])


def precision(
    streams: list[Stream],
    found: list[list[Episode]],
    words: dict[str, np.ndarray],
    bits: int,
    max_distance: int | None = None,
) -> dict[str, Any]:
    """precision@1 of repeated faults: each fault's first episode, in time order, asks an index
    of every window added before it started for the nearest earlier episode (`nearest_events`)
    with the word of its start window, of its peak window, and the nearest over its first 5
    windows; a hit is an episode of the same fault kind. With `max_distance` (as the daemon's
    seen_before), also the share of queries that found any episode that close (`answered`)."""
    rows = _merged(streams, found, words)
    order = sorted((e for per in found for e in per), key=lambda e: (e.start_ts, e.stream))
    kind_of = {e.event_id: e.kind for per in found for e in per}
    index, added = CodeIndex(bits), 0
    seen_kinds: set[str] = set()
    seen_faults: set[tuple[str, int]] = set()
    hits, asked, answered = dict.fromkeys(QUERIES, 0), 0, 0
    limit = bits if max_distance is None else max_distance
    for e in order:
        upto = int(np.searchsorted(rows["ts"], e.start_ts, side="left"))
        index.add_many(*(rows[name][added:upto] for name in _FIELDS))
        added = upto
        # One fault split into two alarms would find itself: only its first episode asks.
        repeated = e.kind in seen_kinds and (e.stream, e.fault) not in seen_faults
        if e.kind is not None:
            seen_kinds.add(e.kind)
            seen_faults.add((e.stream, e.fault))
        if not repeated:
            continue
        asked += 1
        w = words[e.stream]
        queries = {
            "start": w[e.start : e.start + 1],
            "peak": w[e.peak : e.peak + 1],
            "first5": w[e.start : min(e.stop, e.start + 5)],
        }
        for name, qs in queries.items():
            found_ = [index.nearest_events(int(q), 1, max_distance=limit) for q in qs]
            near = min((h[0] for h in found_ if h), key=lambda h: h.distance, default=None)
            hits[name] += near is not None and kind_of[near.event_id] == e.kind
            answered += name == "start" and near is not None
    out: dict[str, Any] = {name: (hit / asked if asked else None) for name, hit in hits.items()}
    out["queries"] = asked
    if max_distance is not None:
        out["answered"] = answered / asked if asked else None
    return out


_FIELDS = ("stream", "ts", "score", "alarm", "event", "word")


def _merged(
    streams: list[Stream], found: list[list[Episode]], words: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Every window of every stream as index rows, in time order."""
    ts = np.concatenate([s.ts for s in streams])
    order = np.argsort(ts, kind="stable")
    names = np.concatenate([[s.name] * len(s.ts) for s in streams])
    events = [x for s, per in zip(streams, found, strict=True) for x in event_ids(s, per)]
    return {
        "stream": names[order].tolist(),
        "ts": ts[order],
        "score": np.concatenate([s.score for s in streams if s.score is not None])[order],
        "alarm": np.concatenate([s.active for s in streams if s.active is not None])[order],
        "event": [events[i] for i in order],
        "word": np.concatenate([words[s.name] for s in streams])[order],
    }


def recall(streams: list[Stream], cut: np.ndarray, queries: int, seed: int) -> dict[str, float]:
    """Of a window's 10 nearest neighbours by Euclidean distance of the continuous code, the
    share among its 10 (and 100) nearest by Hamming distance (the index's own answer, ties
    newest first). Queries: windows of the last stream; the base: the others' windows."""
    bits = len(cut)
    base = streams[:-1] or streams
    stride = 7  # consecutive windows are near-copies: a sparser base asks for real neighbours
    code = np.concatenate([s.code[::stride] for s in base if s.code is not None])
    code = code.astype(np.float64)
    count = len(code)
    index = CodeIndex(bits)
    index.add_many(
        ["base"] * count,
        np.arange(count, dtype=np.float64),  # a row's number as its time: hits name their row
        np.zeros(count),
        np.zeros(count, dtype=bool),
        [None] * count,
        code_words(code, cut, bits),
    )
    last = streams[-1].code
    assert last is not None
    rng = np.random.default_rng([seed, 0x2EC])
    probe = last[rng.choice(len(last), min(queries, len(last)), replace=False)]
    found = {10: 0, 100: 0}
    for q in probe.astype(np.float64):
        truth = set(np.argsort(((code - q) ** 2).sum(axis=1), kind="stable")[:10].tolist())
        word = int(code_words(q[None, :], cut, bits)[0])
        for k in found:
            found[k] += len(truth & {int(h.ts) for h in index.nearest(word, k)})
    total = 10 * len(probe)
    return {"recall_at_10": found[10] / total, "recall_10_at_100": found[100] / total}


def stats(streams: list[Stream], found: list[list[Episode]]) -> dict[str, int]:
    """How many faults the detector caught, and how many episodes were false alarms."""
    faults = sum(len(s.faults) for s in streams)
    caught = {(e.stream, e.fault) for per in found for e in per if e.kind is not None}
    false = sum(e.kind is None for per in found for e in per)
    return {"faults": faults, "faults_alarmed": len(caught), "false_alarms": false}
