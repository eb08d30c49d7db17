"""Record chosen streams' readings into the recording store, off the main loop's hot path.

The main loop calls `record` for every message (a dict look-up, and a tuple appended for the
streams being recorded) and `flush` about once a second: that hands the readings gathered since,
and the alarm / muted / stale periods that began or ended, to a writer thread as one batch, which
it writes in one transaction. The writer also keeps the store within `max_mb` and `max_age_h`,
deleting the oldest readings first and counting them. A writer that falls behind (slow disk)
makes batches wait in a short queue; beyond it, batches are dropped and counted, never the
main loop blocked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import queue
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import RecordSection
from daemon.metrics import Metrics
from daemon.recording import FILE_NAME, connect

if TYPE_CHECKING:
    from daemon.intake import Work
    from daemon.stream import Stream

log = logging.getLogger(__name__)

# Batches waiting for the writer (each is `flush_s` of readings) before new ones are dropped.
MAX_PENDING_BATCHES = 30
# Readings held between two flushes at most (a burst beyond this is dropped and counted).
MAX_BUFFERED_ROWS = 200_000
# Deleting down to this share of max_mb leaves room, so the store is not pruned every flush.
LOW_WATER = 0.9
AGE_CHECK_S = 60.0
_MATCH_CACHE = 10_000

Row = tuple[str, float, str, int, bytes]  # stream, ts, layout key, channel (-1: all), values
# stream, ts, codebook sha256, score, alarm, event id, word (signed 64-bit), signature
CodeRow = tuple[str, float, str, float, int, str | None, int, int | None]


@dataclass(slots=True)
class _MarkOp:
    key: str
    stream: str
    state: str
    start_ts: float
    end_ts: float | None


@dataclass(slots=True)
class _Open:
    key: str
    state: str
    start_ts: float
    last_ts: float


@dataclass
class _Batch:
    rows: list[Row]
    marks: list[_MarkOp]
    layouts: dict[str, tuple[str, float]] = field(default_factory=dict)
    codes: list[CodeRow] = field(default_factory=list)
    codebooks: dict[str, int] = field(default_factory=dict)  # sha256: nbits


class Recorder:
    """Readings of the streams matching `cfg.streams`, into `state_dir/recording.sqlite3`."""

    def __init__(
        self,
        cfg: RecordSection,
        state_dir: Path,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.path = state_dir / FILE_NAME
        self.metrics = metrics
        self.clock = clock
        self.max_bytes = int(cfg.max_mb * 1024 * 1024)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self.path)
        self._close_dangling_marks()
        self._rows: list[Row] = []
        self._marks: list[_MarkOp] = []
        self._codes: list[CodeRow] = []
        self._codebook = ""
        self._codebooks: dict[str, int] = {}
        # Data time of the oldest reading kept, after the writer's last prune (read by the
        # main loop to prune the in-memory code index alike).
        self.oldest_ts = -math.inf
        self._open: dict[str, _Open] = {}
        self._wanted: dict[str, bool] = {}
        self._layout = ""
        self._layouts: dict[str, tuple[str, float]] = {}
        self._boot = uuid.uuid4().hex[:12]
        self._mark_count = 0
        self._queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=MAX_PENDING_BATCHES)
        self._ids: dict[tuple[str, str], int] = {}
        self._next_age_check = 0.0
        self._thread = threading.Thread(target=self._write_loop, name="oteo-recorder", daemon=True)
        self._thread.start()

    # -- main loop ---------------------------------------------------------------------------

    def use_layout(self, channels: list[str], period_s: float) -> None:
        """The channels (in order) and sample period of the readings from now on."""
        key = json.dumps([list(channels), period_s])
        self._layouts[key] = (json.dumps(list(channels)), period_s)
        self._layout = key

    def use_codebook(self, sha256: str, nbits: int) -> None:
        """The model whose hash bits `record_code` gets from now on."""
        self._codebooks[sha256] = nbits
        self._codebook = sha256

    def record_code(
        self,
        stream: str,
        ts: float,
        score: float,
        event_id: str | None,
        word: int,
        sig: int | None = None,
    ) -> None:
        """Keep one scored window's hash bits (and an alarm window's residual signature) for
        the next flush (the stream is recorded)."""
        if len(self._codes) >= MAX_BUFFERED_ROWS:
            self.metrics.recorder_dropped_total.inc()
            return
        signed = word - (1 << 64) if word >= 1 << 63 else word
        alarm = int(event_id is not None)
        self._codes.append((stream, ts, self._codebook, score, alarm, event_id, signed, sig))

    def wants(self, stream: str) -> bool:
        wanted = self._wanted.get(stream)
        if wanted is None:
            wanted = any(fnmatch.fnmatchcase(stream, p) for p in self.cfg.streams)
            if len(self._wanted) >= _MATCH_CACHE:
                self._wanted.clear()
            self._wanted[stream] = wanted
        return wanted

    def record(self, work: Work) -> None:
        """Keep one message's readings for the next flush if its stream is recorded."""
        if not self.wants(work.stream):
            return
        if len(self._rows) >= MAX_BUFFERED_ROWS:
            self.metrics.recorder_dropped_total.inc()
            return
        layout, append = self._layout, self._rows.append
        if work.readings is not None:
            for r in work.readings:
                append((work.stream, r.ts, layout, -1, r.values.astype("<f4").tobytes()))
        elif work.sample is not None:
            ts = work.sample.ts if work.sample.ts is not None else self.clock()
            append((work.stream, ts, layout, work.channel, struct.pack("<f", work.sample.value)))

    def flush(self, streams: Mapping[str, Stream]) -> None:
        """Hand the readings since the last flush and any mark changes to the writer."""
        self._update_marks(streams)
        if not self._rows and not self._marks and not self._codes:
            return
        batch = self._take()
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.metrics.recorder_dropped_total.inc(len(batch.rows) + len(batch.codes))
            # Mark changes matter more than readings: keep them for the next batch.
            self._marks = batch.marks

    def _take(self) -> _Batch:
        batch = _Batch(
            self._rows, self._marks, dict(self._layouts), self._codes, dict(self._codebooks)
        )
        self._rows, self._marks, self._codes = [], [], []
        return batch

    @property
    def backlog(self) -> int:
        """Batches handed over and not yet written."""
        return self._queue.qsize()

    def close(self, timeout_s: float = 5.0) -> None:
        """Close every open mark, write what is pending and stop the writer."""
        for name, open_mark in list(self._open.items()):
            self._close_mark(name, open_mark, open_mark.last_ts)
        batch = self._take()
        try:
            self._queue.put(batch, timeout=timeout_s)
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("recorder: writer did not keep up; the last readings are lost")
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._conn.close()

    def _update_marks(self, streams: Mapping[str, Stream]) -> None:
        seen = set()
        for name, stream in streams.items():
            if not self.wants(name):
                continue
            seen.add(name)
            state = _mark_state(stream)
            current = self._open.get(name)
            if current is not None:
                current.last_ts = max(current.last_ts, stream.last_ts)
                if current.state == state:
                    continue
                self._close_mark(name, current, stream.last_ts)
            if state is not None:
                if state == "alarm" and stream.alarm is not None:
                    start = stream.alarm.started_ts
                else:
                    start = stream.state_since_ts or stream.last_ts
                self._mark_count += 1
                key = f"{self._boot}-{self._mark_count}"
                self._open[name] = _Open(key, state, start, max(start, stream.last_ts))
                self._marks.append(_MarkOp(key, name, state, start, None))
        for name in [n for n in self._open if n not in seen]:  # evicted streams
            self._close_mark(name, self._open[name], self._open[name].last_ts)

    def _close_mark(self, name: str, mark: _Open, end_ts: float) -> None:
        self._marks.append(_MarkOp(mark.key, name, mark.state, mark.start_ts, end_ts))
        del self._open[name]

    # -- writer thread -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._write(batch)
                self._prune()
            except sqlite3.Error as exc:
                self.metrics.recorder_errors_total.inc()
                self.metrics.recorder_dropped_total.inc(len(batch.rows))
                log.error("recorder: cannot write %s: %s", self.path, exc)
                self._ids.clear()  # ids made inside the failed transaction are gone
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")

    def _id(self, table: str, value: str, extra: float | None = None) -> int:
        cached = self._ids.get((table, value))
        if cached is not None:
            return cached
        c = self._conn
        if table == "stream":
            c.execute("INSERT OR IGNORE INTO stream (name) VALUES (?)", (value,))
            row = c.execute("SELECT id FROM stream WHERE name = ?", (value,)).fetchone()
        elif table == "codebook":
            c.execute(
                "INSERT OR IGNORE INTO codebook (sha256, nbits) VALUES (?, ?)", (value, extra)
            )
            row = c.execute("SELECT id FROM codebook WHERE sha256 = ?", (value,)).fetchone()
        else:
            c.execute(
                "INSERT OR IGNORE INTO layout (channels, period_s) VALUES (?, ?)", (value, extra)
            )
            row = c.execute(
                "SELECT id FROM layout WHERE channels = ? AND period_s = ?", (value, extra)
            ).fetchone()
        self._ids[(table, value)] = int(row[0])
        return int(row[0])

    def _write(self, batch: _Batch) -> None:
        c = self._conn
        c.execute("BEGIN")
        layout_ids = {
            key: self._id("layout", channels, period)
            for key, (channels, period) in batch.layouts.items()
        }
        c.executemany(
            "INSERT INTO reading (stream, ts, layout, channel, value) VALUES (?, ?, ?, ?, ?)",
            [
                (self._id("stream", s), ts, layout_ids[lay], ch, v)
                for s, ts, lay, ch, v in batch.rows
            ],
        )
        if batch.codes:
            books = {
                sha: self._id("codebook", sha, nbits) for sha, nbits in batch.codebooks.items()
            }
            c.executemany(
                "INSERT INTO code (stream, ts, codebook, score, alarm, event, word, sig) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (self._id("stream", s), ts, books[sha], score, alarm, event, word, sig)
                    for s, ts, sha, score, alarm, event, word, sig in batch.codes
                ],
            )
        for m in batch.marks:
            c.execute(
                "INSERT INTO mark (key, stream, state, start_ts, end_ts) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET end_ts = excluded.end_ts",
                (m.key, self._id("stream", m.stream), m.state, m.start_ts, m.end_ts),
            )
        c.execute("COMMIT")
        self.metrics.recorder_readings_total.inc(len(batch.rows))

    def used_bytes(self) -> int:
        """Size of the database (its file once the WAL is checkpointed), free pages included."""
        c = self._conn
        pages = c.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * c.execute("PRAGMA page_size").fetchone()[0])

    def _prune(self) -> None:
        c = self._conn
        deleted = False
        now = self.clock()
        if now >= self._next_age_check:
            self._next_age_check = now + AGE_CHECK_S
            cutoff = now - self.cfg.max_age_h * 3600.0
            n = c.execute("DELETE FROM reading WHERE ts < ?", (cutoff,)).rowcount
            c.execute("DELETE FROM mark WHERE end_ts IS NOT NULL AND end_ts < ?", (cutoff,))
            _delete_codes_before(c, cutoff)
            self.oldest_ts = max(self.oldest_ts, cutoff)
            if n > 0:
                self.metrics.recorder_deleted_total.labels(reason="age").inc(n)
                deleted = True
        used = self.used_bytes()
        if used > self.max_bytes:
            _vacuum(c)  # free pages first: deletes may not be needed
            used = self.used_bytes()
        for _ in range(5):  # the size per row is an estimate: usually one round is enough
            if used <= self.max_bytes:
                break
            low, high = c.execute("SELECT MIN(id), MAX(id) FROM reading").fetchone()
            if low is None:
                break
            per_row = used / (high - low + 1)
            excess = math.ceil((used - LOW_WATER * self.max_bytes) / per_row)
            n = c.execute("DELETE FROM reading WHERE id < ?", (low + excess,)).rowcount
            self.metrics.recorder_deleted_total.labels(reason="size").inc(n)
            deleted = True
            _vacuum(c)
            used = self.used_bytes()
        if deleted:
            oldest = c.execute("SELECT MIN(ts) FROM reading").fetchone()[0]
            if oldest is not None:
                _delete_codes_before(c, oldest)
                self.oldest_ts = max(self.oldest_ts, oldest)
            _vacuum(c)
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.metrics.recorder_bytes.set(self.used_bytes())

    def _close_dangling_marks(self) -> None:
        """Marks left open by a crash end at their stream's last reading after them."""
        self._conn.execute(
            "UPDATE mark SET end_ts = COALESCE((SELECT MAX(r.ts) FROM reading r "
            "WHERE r.stream = mark.stream AND r.ts >= mark.start_ts), mark.start_ts) "
            "WHERE end_ts IS NULL"
        )


def _delete_codes_before(conn: sqlite3.Connection, ts: float) -> None:
    """Codes are written in time order: delete by id up to the first one at or after `ts`
    (a short scan from the oldest, no index on ts needed)."""
    conn.execute(
        "DELETE FROM code WHERE id < COALESCE((SELECT id FROM code WHERE ts >= ? ORDER BY id "
        "LIMIT 1), (SELECT MAX(id) + 1 FROM code))",
        (ts,),
    )


def _vacuum(conn: sqlite3.Connection) -> None:
    # The pragma frees one page per step: it must be run to completion.
    conn.execute("PRAGMA incremental_vacuum").fetchall()


def _mark_state(stream: Stream) -> str | None:
    if stream.alarm is not None or stream.state == "anomalous":
        return "alarm"
    if stream.state in ("muted", "stale"):
        return stream.state
    return None
