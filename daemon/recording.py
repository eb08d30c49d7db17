"""The recording store: one SQLite file of readings and of the periods to leave out of training.

The daemon writes it (`daemon.recorder`), `oteo retrain` reads it, possibly on another host.
Tables:
- `layout`: the channel names (and sample period) a reading's values are in; a model with other
  channels starts a new layout, so old readings keep their meaning.
- `stream`: stream ids.
- `reading`: one row per reading, data time `ts` (unix s), `channel` -1 and the float32 values of
  every channel, or a channel index and that channel's one value (per-channel topics).
- `mark`: a period a stream was in alarm, muted or stale (`end_ts` NULL while it lasts).
- `codebook` and `code`: the hash bits of every scored window of a recorded stream, with its
  score, whether it was in an alarm and that alarm's event id; bits belong to one model file
  (`codebook.sha256`): another model's codes are not comparable. Same retention as readings.

Copy a live store with `sqlite3 recording.sqlite3 ".backup copy.sqlite3"` (or copy the file
while the daemon is stopped): the WAL file next to it holds the last seconds of a running store.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
FILE_NAME = "recording.sqlite3"
MARK_STATES = ("alarm", "muted", "stale")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layout (
    id INTEGER PRIMARY KEY,
    channels TEXT NOT NULL,
    period_s REAL NOT NULL,
    UNIQUE (channels, period_s)
);
CREATE TABLE IF NOT EXISTS stream (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS reading (
    id INTEGER PRIMARY KEY,  -- insertion order: the oldest rows go first when the store is full
    stream INTEGER NOT NULL,
    ts REAL NOT NULL,
    layout INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reading_ts ON reading (ts);
CREATE TABLE IF NOT EXISTS codebook (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    nbits INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS code (
    id INTEGER PRIMARY KEY,
    stream INTEGER NOT NULL,
    ts REAL NOT NULL,
    codebook INTEGER NOT NULL,
    score REAL NOT NULL,
    alarm INTEGER NOT NULL,
    event TEXT,   -- the alarm's event id while in an alarm
    word INTEGER NOT NULL,  -- hash bits, bit 0 of the code most significant; signed 64-bit
    sig INTEGER   -- alarm windows: the residual signature (daemon/signature.py)
);
CREATE TABLE IF NOT EXISTS mark (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    stream INTEGER NOT NULL,
    state TEXT NOT NULL,
    start_ts REAL NOT NULL,
    end_ts REAL
);
"""


class RecordingError(ValueError):
    """A recording cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Mark:
    """A period [start_ts, end_ts] (data time) a stream was in alarm, muted or stale."""

    stream: str
    state: str
    start_ts: float
    end_ts: float | None  # None: it had not ended when the copy was made


@dataclass
class StreamRecording:
    """One stream's readings in one layout, in time order; NaN where a channel did not report."""

    stream: str
    channels: list[str]
    period_s: float
    ts: np.ndarray  # float64 [N]
    values: np.ndarray  # float64 [N, C]
    marks: list[Mark] = field(default_factory=list)


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a store with the settings the writer and readers share."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    # auto_vacuum must be chosen before the first table exists: it lets deletes shrink the file.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL + NORMAL: a commit is not fsynced; a power cut loses at most the last flushes.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 256")
    conn.execute("PRAGMA journal_size_limit = 1048576")
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    return conn


def read(path: Path, streams: list[str] | None = None) -> list[StreamRecording]:
    """Every stream's readings (or those named), one entry per stream and channel layout.

    The file is first copied with SQLite's backup API (to a temporary file), so a store the
    daemon is writing to is read consistently.
    """
    if not path.is_file():
        raise RecordingError(f"{path}: no such recording (record.streams in the daemon config)")
    with tempfile.TemporaryDirectory(prefix="oteo-recording-") as tmp:
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
            snapshot = sqlite3.connect(Path(tmp) / FILE_NAME)
            try:
                source.backup(snapshot)
            finally:
                source.close()
        except sqlite3.Error as exc:
            raise RecordingError(f"{path}: not a readable recording ({exc})") from exc
        try:
            return _read(snapshot, path, streams)
        except sqlite3.Error as exc:
            raise RecordingError(f"{path}: not an oteo recording ({exc})") from exc
        finally:
            snapshot.close()


def _read(conn: sqlite3.Connection, path: Path, streams: list[str] | None) -> list[StreamRecording]:
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or int(version[0]) != SCHEMA_VERSION:
        raise RecordingError(f"{path}: recording schema {version} is not {SCHEMA_VERSION}")
    layouts = {
        lid: (json.loads(names), period)
        for lid, names, period in conn.execute("SELECT id, channels, period_s FROM layout")
    }
    names = dict(conn.execute("SELECT id, name FROM stream").fetchall())
    marks: dict[str, list[Mark]] = {}
    for sid, state, start, end in conn.execute(
        "SELECT stream, state, start_ts, end_ts FROM mark ORDER BY start_ts"
    ):
        marks.setdefault(names[sid], []).append(Mark(names[sid], state, start, end))
    out: list[StreamRecording] = []
    for sid, name in sorted(names.items(), key=lambda item: item[1]):
        if streams is not None and name not in streams:
            continue
        for (lid,) in conn.execute(
            "SELECT DISTINCT layout FROM reading WHERE stream = ? ORDER BY layout", (sid,)
        ).fetchall():
            channels, period = layouts[lid]
            ts, values = _arrays(conn, sid, lid, len(channels))
            out.append(StreamRecording(name, channels, period, ts, values, marks.get(name, [])))
    return out


def _arrays(
    conn: sqlite3.Connection, stream: int, layout: int, n_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """One stream's readings in one layout, in time order, filled in chunks (bounded memory)."""
    where = "FROM reading WHERE stream = ? AND layout = ?"
    (count,) = conn.execute(f"SELECT COUNT(*) {where}", (stream, layout)).fetchone()
    ts = np.empty(count, dtype=np.float64)
    values = np.full((count, n_channels), np.nan)
    cursor = conn.execute(f"SELECT ts, channel, value {where} ORDER BY ts, id", (stream, layout))
    i = 0
    while rows := cursor.fetchmany(10_000):
        for t, channel, blob in rows:
            ts[i] = t
            data = np.frombuffer(blob, dtype="<f4")
            if channel < 0:
                values[i] = data
            else:
                values[i, channel] = data[0]
            i += 1
    return ts, values


# streams, ts, score, alarm, event ids, words (uint64), signatures (int64, -1: none)
WindowRows = tuple[
    list[str], np.ndarray, np.ndarray, np.ndarray, list[str | None], np.ndarray, np.ndarray
]


def read_windows(path: Path, sha256: str, chunk: int = 200_000) -> Iterator[WindowRows]:
    """The recorded windows of one model, oldest first, in chunks (`WindowRows`). Nothing if
    the file or the model has none."""
    if not path.is_file():
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        found = conn.execute("SELECT id FROM codebook WHERE sha256 = ?", (sha256,)).fetchone()
        if found is None:
            return
        names = dict(conn.execute("SELECT id, name FROM stream").fetchall())
        cursor = conn.execute(
            "SELECT stream, ts, score, alarm, event, word, COALESCE(sig, -1) FROM code "
            "WHERE codebook = ? ORDER BY id",
            (found[0],),
        )
        while rows := cursor.fetchmany(chunk):
            streams, ts, score, alarm, events, words, sigs = zip(*rows, strict=True)
            yield (
                [names[s] for s in streams],
                np.asarray(ts, dtype=np.float64),
                np.asarray(score, dtype=np.float32),
                np.asarray(alarm, dtype=bool),
                list(events),
                np.asarray(words, dtype=np.int64).view(np.uint64),
                np.asarray(sigs, dtype=np.int64),
            )
    finally:
        conn.close()
