"""`oteo benchmark similar`: search speed and memory of the similar-window index, and whether the
nearest earlier alarm of a repeated fault is of the same kind (precision@1).

Two models are trained inside the command on simulated normal data of the pump (or given with
`--model` / `--hash-model`): the default dense denoising autoencoder, whose bits are its code
above the code's training median, and a `--hashing` one, whose bits are its code above 0.5.

- precision@1: simulated streams with a fault every `every_s` (six kinds, each hitting its own
  channels every time, training/bench/signature.py); the model's own detector (daemon/detector.py,
  the manifest's stages) finds the alarm episodes, each is matched to the fault it overlaps.
  In time order, each repeated fault's first episode asks `nearest_events` of an index holding
  every window seen before it started (what the daemon has when it publishes `start`), with the
  code of its start window (also: its peak window; the nearest over its first 5 windows); a hit
  is the nearest earlier episode being of the same kind. Fewer bits: the first m code units.
  Beside the code's bits, the same search with a residual signature of each window (3 bits a
  channel: mean residual high / low, error large; daemon/signature.py, as seen_before uses it).
- recall@10: how many of a window's 10 nearest neighbours by Euclidean distance of the
  continuous code are among its 10 (and 100) nearest by Hamming distance of the bits.
- speed and memory: `days` x `streams` x 86,400 windows (1 Hz, hop 1). `real_days` stream-days
  are simulated with faults, encoded and replayed through the detector for real; each stream-day
  of the index is one of them, picked at random per stream and day (scoring 26 M windows and
  replaying the detector over them would take ~10 minutes per model; the tiles keep the real
  days' distribution of words, with fewer distinct words than 300 different days would have). Each
  query is a random window of the index, k = 10, its own stream's hour around it excluded; timed
  on one core (the process pinned to one CPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from daemon.section import SimilarSection

KINDS = ("default", "hashing")
DAY_S = 86_400
EXCLUDE_S = 3600.0  # a query's own stream within an hour of it is its own neighbourhood
SEEN_BEFORE_DISTANCE = SimilarSection().max_distance  # the daemon's default bound


@dataclass(frozen=True)
class Sizes:
    train_rows: int  # simulated normal rows to train each model on (4 runs)
    epochs: int
    window: int
    hidden: int
    code: int  # code units = hash bits
    streams: int  # streams of the precision scenario
    hours: float  # per stream
    every_s: int  # a fault in every slot of this length
    real_days: int  # stream-days encoded for real for the speed index
    day_rows: int  # windows per stream-day of the speed index (86,400 at 1 Hz)
    queries: int


FULL = Sizes(40_000, 20, 32, 128, 16, 8, 10.0, 1200, 12, DAY_S, 400)
QUICK = Sizes(8000, 8, 16, 32, 8, 3, 3.0, 600, 2, 7200, 200)


def train_models(
    sizes: Sizes, folder: Path, seed: int, log: Any, kinds: list[str]
) -> dict[str, Path]:
    """Train models of `kinds` (default, hashing) on 4 runs of simulated normal pump data."""
    from training.config import FitConfig, ModelConfig, TrainOptions
    from training.data import from_array
    from training.pipeline import train
    from training.simulator import CHANNELS, MachineSimulator

    runs = [MachineSimulator(10_000 + seed + r).step(sizes.train_rows // 4) for r in range(4)]
    gap = np.full((1, len(CHANNELS)), np.nan)  # a NaN row splits segments: no window spans runs
    values = np.concatenate([part for run in runs for part in (run, gap)][:-1])
    table = from_array(values, 1.0, channels=CHANNELS)
    paths = {}
    for kind in kinds:
        model = ModelConfig(
            channels=len(CHANNELS),
            window=sizes.window,
            hidden=sizes.hidden,
            code_size=sizes.code,
            hashing=kind == "hashing",
        )
        opts = TrainOptions(
            model=model,
            fit=FitConfig(max_epochs=sizes.epochs, seed=seed, progress=False),
            name=f"similar-{kind}",
        )
        log(f"training the {kind} model ({sizes.train_rows} rows, {sizes.epochs} epochs)")
        paths[kind] = train(table, opts, folder / f"similar-{kind}.onnx").path
    return paths


def speed(
    model: Any, real: list[Any], found: list[Any], layout: tuple[int, int, int], sizes: Sizes,
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Build the `days` x `streams` index from the real stream-days and time searches on it."""
    from daemon.hashindex import popcount
    from daemon.hashstore import word_dtype

    rng = np.random.default_rng([seed, 0xDA7])
    t0 = time.perf_counter()
    index, every, alarm = _tiled(model, real, found, layout, sizes.day_rows, rng)
    load_s = time.perf_counter() - t0
    memory = index.nbytes
    bits, streams = index.bits, layout[1]
    in_alarm = np.flatnonzero(alarm)
    with one_core():
        near, events = _timed(index, every, rng.integers(0, len(every), sizes.queries), layout,
                              sizes.day_rows)  # fmt: skip
        alarm_near, _ = _timed(index, every, rng.choice(in_alarm, min(len(in_alarm), 200)),
                               layout, sizes.day_rows)  # fmt: skip
        narrow = every.astype(word_dtype(bits))
        t = time.perf_counter()
        for word in narrow[rng.integers(0, len(narrow), 10)]:
            np.argpartition(popcount(narrow ^ word), 10)[:10]
        brute_ms = (time.perf_counter() - t) / 10 * 1000
        t, last = time.perf_counter(), float(layout[0] * DAY_S)
        for i in range(20_000):
            index.add(f"stream-{i % streams}", last + i, 0.0, False, None, int(every[i]))
        add_us = (time.perf_counter() - t) / 20_000 * 1e6
    return {
        "windows": len(every),
        "p50_ms": float(np.percentile(near, 50)),
        "p99_ms": float(np.percentile(near, 99)),
        "alarm_query_p99_ms": float(np.percentile(alarm_near, 99)) if len(in_alarm) else None,
        "events_p99_ms": float(np.percentile(events, 99)),
        "index_bytes": memory,
        "bytes_per_window": memory / len(every),
        "distinct_words": len(np.unique(every)),
        "alarm_share": len(in_alarm) / len(every),
        "load_s": load_s,
        "add_us": add_us,
        "brute_force_ms": brute_ms,
    }


def _tiled(
    model: Any, real: list[Any], found: list[Any], layout: tuple[int, int, int], per_day: int,
    rng: np.random.Generator,
) -> tuple[Any, np.ndarray, np.ndarray]:  # fmt: skip
    """The index of `days` x `streams` stream-days, each one of the real ones picked at random,
    rows in time order (second by second, stream by stream); also every row's word and alarm."""
    from daemon.hashindex import CodeIndex
    from training.bench.recurrence import code_words
    from training.bench.signature import event_ids

    days, streams, windows = layout
    cut = np.asarray(model.manifest.hash_cut())
    blocks = [code_words(s.code, cut, len(cut))[:per_day] for s in real]
    events = [event_ids(s, per)[:per_day] for s, per in zip(real, found, strict=True)]
    pick = rng.integers(0, len(real), size=(days, streams))
    names = [f"stream-{i}" for i in range(streams)]
    index = CodeIndex(len(cut))
    every, alarm = np.empty(windows, dtype=np.uint64), np.empty(windows, dtype=bool)
    for d in range(days):
        rows = min(per_day, (windows - d * per_day * streams) // streams)
        chosen, at = [real[b] for b in pick[d]], d * per_day * streams
        word = np.stack([blocks[b][:rows] for b in pick[d]], axis=1).ravel()
        active = np.stack([c.active[:rows] for c in chosen], axis=1).ravel()
        every[at : at + len(word)], alarm[at : at + len(word)] = word, active
        ev: list[str | None] = [None] * (rows * streams)
        for s, b in enumerate(pick[d]):
            ev[s::streams] = [None if x is None else f"{x}/{s}/{d}" for x in events[b][:rows]]
        index.add_many(
            names * rows,
            np.repeat(d * DAY_S + np.arange(rows, dtype=np.float64), streams),
            np.stack([c.score[:rows] for c in chosen], axis=1).ravel(),
            active,
            ev,
            word,
        )
    return index, every[: len(index)], alarm[: len(index)]


def _timed(
    index: Any, every: np.ndarray, rows: np.ndarray, layout: tuple[int, int, int], per_day: int
) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds of `nearest` (k = 10, the query's own hour excluded) and of
    `nearest_events` (5 within a quarter of the bits) for the words of index rows `rows`."""
    streams = layout[1]
    # Row r: day r // (streams * per_day), second (r // streams) % per_day, stream r % streams.
    ts = (rows // streams % per_day + rows // (streams * per_day) * DAY_S).astype(np.float64)
    near, events = [], []
    for word, s, t_s in zip(every[rows], rows % streams, ts, strict=True):
        t = time.perf_counter()
        index.nearest(int(word), 10, exclude_stream=f"stream-{s}",
                      exclude_from_ts=t_s - EXCLUDE_S, exclude_to_ts=t_s + EXCLUDE_S)  # fmt: skip
        near.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.nearest_events(int(word), 5, max_distance=index.bits // 4)
        events.append(time.perf_counter() - t)
    return 1000 * np.array(near), 1000 * np.array(events)


@contextmanager
def one_core() -> Iterator[None]:
    """Pin this process to one CPU (where the OS lets us) while timing."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if allowed:
        os.sched_setaffinity(0, {max(allowed)})
    try:
        yield
    finally:
        if allowed:
            os.sched_setaffinity(0, allowed)


def measure(
    kind: str, path: Path, sizes: Sizes, layout: tuple[int, int, int], seed: int, log: Any
) -> dict[str, Any]:
    """Every figure for one model file."""
    from daemon.model import Model
    from daemon.signature import ResidualSignature
    from training.bench.recurrence import code_words, precision, recall, stats
    from training.bench.signature import (
        encode,
        episodes,
        signatures,
        simulate_stream,
    )

    model = Model.load(path)
    given_cut = model.manifest.hash_cut()
    if given_cut is None:
        raise click.ClickException(
            f"{path}: this model has no hash rule (no code_median); re-export it"
        )
    cut = np.asarray(given_cut)
    bits, channels = len(cut), signatures(seed)
    rows = int(sizes.hours * 3600)
    log(f"{kind}: {sizes.streams} streams x {sizes.hours:g} h with repeated faults, encoded")
    streams = [
        simulate_stream(f"pump-{i}", 100 + 1000 * seed + i, rows, sizes.every_s, channels=channels)
        for i in range(sizes.streams)
    ]
    for stream in streams:
        encode(model, stream)
    found = [episodes(s) for s in streams]
    by_bits = {
        m: precision(streams, found, {s.name: code_words(s.code, cut, m) for s in streams}, m)
        for m in (bits, 12, 8, 4)
        if m <= bits
    }
    # The daemon's residual signature (levels from the manifest), as seen_before compares.
    rule = ResidualSignature.of(model.manifest)
    if rule is None:
        raise click.ClickException(f"{path}: no residual signature for this model")
    sig_words = {s.name: rule.words_of(s.residual, s.channel_score) for s in streams}
    by_residual = precision(streams, found, sig_words, rule.bits)
    seen_before = precision(streams, found, sig_words, rule.bits, SEEN_BEFORE_DISTANCE)
    near = recall(streams, cut, sizes.queries, seed)
    log(f"{kind}: {sizes.real_days} stream-days encoded for the speed index")
    length = sizes.day_rows + model.window - 1
    real = [
        simulate_stream(
            f"day-{i}", 5000 + 1000 * seed + i, length, sizes.day_rows // 8, channels=channels
        )
        for i in range(sizes.real_days)
    ]
    for stream in real:
        encode(model, stream)
    log(f"{kind}: index of {layout[2]:,} windows, {sizes.queries} timed queries")
    fast = speed(model, real, [episodes(s) for s in real], layout, sizes, seed)
    return {
        "bits": bits,
        "precision": by_bits,
        "precision_residual": by_residual,
        "seen_before": seen_before,
        "residual_bits": rule.bits,
        "recall": near,
        "episodes": stats(streams, found),
        "speed": fast,
    }


def report(
    results: dict[str, dict[str, Any]], sizes: Sizes, layout: tuple[int, int, int]
) -> dict[str, Any]:
    """The JSON report: headline figures first, then each model kind's details."""
    days, streams, windows = layout
    top = {k: r["precision"][r["bits"]] for k, r in results.items()}
    speeds = {k: r["speed"] for k, r in results.items()}
    first = next(iter(speeds.values()))
    return {
        "windows": first["windows"],
        "p50_ms": max(s["p50_ms"] for s in speeds.values()),
        "p99_ms": max(s["p99_ms"] for s in speeds.values()),
        "index_bytes": first["index_bytes"],
        "bytes_per_window": first["bytes_per_window"],
        "precision_at_1": {k: p["start"] for k, p in top.items()},
        "precision_at_1_peak": {k: p["peak"] for k, p in top.items()},
        "precision_at_1_first5": {k: p["first5"] for k, p in top.items()},
        "precision_at_1_residual": {
            k: {q: r["precision_residual"][q] for q in ("start", "peak", "first5")}
            for k, r in results.items()
        },
        "precision_queries": {k: p["queries"] for k, p in top.items()},
        "residual_bits": {k: r["residual_bits"] for k, r in results.items()},
        # seen_before as the daemon gives it (start window, the default distance bound): the
        # share of repeated faults that name any earlier episode, and precision@1 among all.
        "seen_before": {
            k: {
                "max_distance": SEEN_BEFORE_DISTANCE,
                "answered": r["seen_before"]["answered"],
                "precision_at_1": r["seen_before"]["start"],
            }
            for k, r in results.items()
        },
        "precision_by_bits": {
            k: {str(m): p["start"] for m, p in r["precision"].items()} for k, r in results.items()
        },
        "recall_at_10": {k: r["recall"]["recall_at_10"] for k, r in results.items()},
        "recall_10_at_100": {k: r["recall"]["recall_10_at_100"] for k, r in results.items()},
        "episodes": {k: r["episodes"] for k, r in results.items()},
        "speed": speeds,
        "windows_made": (
            f"{days} days x {streams} streams x {sizes.day_rows} windows (hop 1), {windows:,} in "
            f"all: each stream-day is one of {sizes.real_days} simulated pump days (a fault every "
            f"{sizes.day_rows // 8 // 60} min) encoded by the model and replayed through its "
            "detector, picked at random per stream and day"
        ),
        "sizes": asdict(sizes),
    }


def table(out: dict[str, Any]) -> str:
    """The report for people."""
    lines = [f"similar-window index: {out['windows']:,} windows ({out['windows_made']})"]
    for kind, s in out["speed"].items():
        lines.append(
            f"  {kind:8s} k=10 p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms (alarm windows: "
            f"{_f(s['alarm_query_p99_ms'], 2)} ms)  |  events p99 "
            f"{s['events_p99_ms']:.2f} ms  |  {s['index_bytes'] / 2**20:.0f} MiB "
            f"({s['bytes_per_window']:.1f} B/window, {s['distinct_words']} distinct words)  |  "
            f"add {s['add_us']:.1f} us, bulk load {s['load_s']:.1f} s  |  brute force "
            f"{s['brute_force_ms']:.1f} ms"
        )
    lines.append("repeated faults: the nearest earlier episode is of the same kind (precision@1)")
    for kind in out["precision_at_1"]:
        by_bits = "  ".join(f"{m} bits {_f(v)}" for m, v in out["precision_by_bits"][kind].items())
        e = out["episodes"][kind]
        lines.append(
            f"  {kind:8s} start {_f(out['precision_at_1'][kind])}  peak "
            f"{_f(out['precision_at_1_peak'][kind])}  first 5 "
            f"{_f(out['precision_at_1_first5'][kind])}"
            f"  ({out['precision_queries'][kind]} queries; {e['faults_alarmed']}/{e['faults']} "
            f"faults alarmed, {e['false_alarms']} false alarms)  |  start, fewer bits: {by_bits}"
        )
    for kind, by in out["precision_at_1_residual"].items():
        lines.append(
            f"  {kind:8s} residual signature ({out['residual_bits'][kind]} bits): start "
            f"{_f(by['start'])}  peak {_f(by['peak'])}  first 5 {_f(by['first5'])}"
        )
    for kind, sb in out["seen_before"].items():
        lines.append(
            f"  {kind:8s} seen_before (start, within {sb['max_distance']} bits): names an "
            f"earlier episode for {_f(sb['answered'])} of repeated faults, the right kind "
            f"first for {_f(sb['precision_at_1'])}"
        )
    lines.append("Hamming vs Euclidean neighbours of the continuous code")
    for kind, r in out["recall_at_10"].items():
        lines.append(
            f"  {kind:8s} recall@10 {r:.3f}  (Euclidean top 10 in Hamming top 100: "
            f"{out['recall_10_at_100'][kind]:.3f})"
        )
    return "\n".join(lines)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--windows", type=click.IntRange(min=1), help="Windows in the speed index "
              "(default: days x streams x 86,400).")  # fmt: skip
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--streams", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A default (non-hashing) model file instead of training one.")  # fmt: skip
@click.option("--hash-model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A --hashing model file instead of training one.")  # fmt: skip
@click.option("--quick", is_flag=True, help="Tiny models and data (seconds, for tests).")
@click.option("--seed", type=int, default=0, show_default=True)
def similar(
    as_json: bool,
    windows: int | None,
    days: int,
    streams: int,
    model_path: Path | None,
    hash_model: Path | None,
    quick: bool,
    seed: int,
) -> None:
    """Similar-window search: latency and memory over DAYS x STREAMS of 1 Hz windows, and
    precision@1 of repeated faults, for a default and a --hashing model."""

    def log(text: str) -> None:
        click.echo(f"· {text}", err=True)

    sizes = QUICK if quick else FULL
    # Whole seconds of all streams: a window count that is a multiple of the streams.
    total = max(streams, (windows or days * streams * sizes.day_rows) // streams * streams)
    layout = (-(-total // (streams * sizes.day_rows)), streams, total)
    with tempfile.TemporaryDirectory(prefix="oteo-similar-") as tmp:
        given = {"default": model_path, "hashing": hash_model}
        paths = {k: p for k, p in given.items() if p is not None}
        if len(paths) < len(KINDS):
            trained = train_models(
                sizes, Path(tmp), seed, log, [k for k in KINDS if k not in paths]
            )
            paths.update(trained)
        results = {kind: measure(kind, paths[kind], sizes, layout, seed, log) for kind in KINDS}
    out = report(results, sizes, layout)
    click.echo(json.dumps(out, indent=2) if as_json else table(out))
