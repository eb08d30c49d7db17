"""`oteo benchmark recorder`: what recording costs the daemon's main loop, and the writer's pace.

Feeds `--streams` streams of one reading per message (the common case, and the most calls per
reading) through `Recorder.record`, flushing once per simulated second as the daemon does, and
prints: the main loop's time per message in `record` and per `flush`, the readings per second
the writer thread commits, and the bytes each reading takes in the store. With `--codes` (the
default) each reading also completes a window (hop 1) whose 16 hash bits the main loop keeps,
as for a recorded stream of a model that hashes: `CodeIndex.add` and `Recorder.record_code`,
timed apart, and the store's size then includes the `code` table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np


@click.command()
@click.option("--streams", default=100, show_default=True, help="Streams recorded.")
@click.option("--seconds", default=600, show_default=True, help="Simulated seconds (1 Hz each).")
@click.option("--channels", default=8, show_default=True)
@click.option("--codes/--no-codes", default=True, show_default=True, help="Keep hash bits too.")
def recorder(streams: int, seconds: int, channels: int, codes: bool) -> None:
    """Recording overhead on the main loop and writer throughput (prints numbers)."""
    from daemon.config import RecordSection
    from daemon.hashindex import CodeIndex
    from daemon.intake import Work, new_layout
    from daemon.metrics import Metrics
    from daemon.reading import ParsedReading
    from daemon.recorder import Recorder

    rng = np.random.default_rng(0)
    names = [f"pump-{i}" for i in range(streams)]
    rows = rng.normal(size=(seconds, channels))
    t0 = time.time() - seconds
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Metrics()
        rec = Recorder(RecordSection(streams=["pump-*"]), Path(tmp), metrics)
        names_c = [f"c{i}" for i in range(channels)]
        rec.use_layout(names_c, 1.0)
        rec.use_codebook("0" * 64, 16)
        index = CodeIndex(16)
        words = rng.integers(0, 1 << 16, size=(seconds, streams)).tolist()
        layout = new_layout(names_c)
        record_s = flush_s = code_s = 0.0
        wall = time.perf_counter()
        for second in range(seconds):
            work = [
                Work(name, [ParsedReading(t0 + second, None, rows[second])], layout)
                for name in names
            ]
            start = time.perf_counter()
            for w in work:
                rec.record(w)
            record_s += time.perf_counter() - start
            if codes:
                start = time.perf_counter()
                ts = t0 + second
                for name, word in zip(names, words[second], strict=True):
                    index.add(name, ts, 0.5, False, None, word)
                    rec.record_code(name, ts, 0.5, None, word)
                code_s += time.perf_counter() - start
            start = time.perf_counter()
            rec.flush({})
            flush_s += time.perf_counter() - start
            while rec.backlog > 1:  # faster than real time: wait for the writer, never drop
                time.sleep(0.001)
        fed_s = time.perf_counter() - wall
        rec.close(timeout_s=600)
        total_s = time.perf_counter() - wall
        n = streams * seconds
        written = metrics.registry.get_sample_value("oteo_recorder_readings_total") or 0
        dropped = metrics.registry.get_sample_value("oteo_recorder_dropped_total") or 0
        size = (Path(tmp) / "recording.sqlite3").stat().st_size
    click.echo(f"{n} readings ({streams} streams x {seconds} s, {channels} channels)")
    click.echo(
        f"main loop: record {1e6 * record_s / n:.2f} us/message, "
        f"flush {1e3 * flush_s / seconds:.3f} ms/call"
    )
    if codes:
        click.echo(
            f"hash bits: {1e6 * code_s / n:.2f} us/window on the main loop, "
            f"index {index.nbytes / n:.1f} bytes/window in memory"
        )
    click.echo(
        f"writer: {written / total_s:,.0f} readings/s committed "
        f"({total_s:.2f} s for all, {fed_s:.2f} s fed), dropped {dropped:.0f}"
    )
    what = "reading and window" if codes else "reading"
    click.echo(f"store: {size / max(written, 1):.1f} bytes per {what} ({size / 1e6:.1f} MB)")
