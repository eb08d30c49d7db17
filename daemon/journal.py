"""The event journal: every alarm episode the daemon raised, and the operators' labels of them.

One SQLite file, `state_dir/events.sqlite3`, beside the recording. The main loop writes an
episode when it starts and again when it ends; HTTP and MQTT op threads label episodes and list
them; `oteo retrain` reads the labelled periods (possibly on another host, from a copy). A label
is `false_alarm` (the process was normal: keep that period as training data) or `confirmed`
with a free-text cause (leave it out); a new label of the same episode replaces the old one.

The journal keeps at most `max_events` episodes: beyond, the oldest unlabelled ones go first,
so labels outlive the episodes nobody looked at.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.messages import LABELS, Event, Label, format_ts

FILE_NAME = "events.sqlite3"
SCHEMA_VERSION = 1
MAX_EVENTS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS episode (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    started_ts REAL NOT NULL,
    ended_ts REAL,
    reason TEXT,
    peak_score REAL NOT NULL,
    top_channels TEXT NOT NULL,  -- JSON list of channel names, largest contribution first
    model_sha256 TEXT NOT NULL,
    start_word INTEGER,          -- hash bits of the window that started it (NULL: no hash rule)
    peak_word INTEGER,           -- hash bits of its peak window
    start_sig INTEGER,           -- residual signatures of those windows (daemon/signature.py)
    peak_sig INTEGER
);
CREATE INDEX IF NOT EXISTS episode_started ON episode (started_ts);
CREATE TABLE IF NOT EXISTS similar_mute (
    event_id TEXT PRIMARY KEY,  -- a false_alarm episode: hold back alarms that hash like it
    until_ts REAL NOT NULL      -- wall clock
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS label (
    event_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    cause TEXT,
    labelled_by TEXT,
    labelled_ts REAL NOT NULL
) WITHOUT ROWID;
"""


class JournalError(ValueError):
    """The journal cannot be opened or read; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class Episode:
    """One alarm episode as journalled, with its label if it has one."""

    event_id: str
    stream: str
    started_ts: float
    ended_ts: float | None
    reason: str | None
    peak_score: float
    top_channels: list[str]
    model_sha256: str
    start_word: int | None
    peak_word: int | None
    start_sig: int | None = None
    peak_sig: int | None = None
    label: Label | None = None
    cause: str | None = None
    labelled_by: str | None = None
    labelled_ts: float | None = None
    mute_similar_until_ts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of `GET /v1/events` and of a label reply."""
        return {
            "event_id": self.event_id,
            "stream": self.stream,
            "started": format_ts(self.started_ts),
            "ended": format_ts(self.ended_ts) if self.ended_ts is not None else None,
            "reason": self.reason,
            "peak_score": self.peak_score,
            "top_channels": self.top_channels,
            "model_sha256": self.model_sha256,
            "label": self.label,
            "cause": self.cause,
            "labelled_by": self.labelled_by,
            "labelled": format_ts(self.labelled_ts) if self.labelled_ts is not None else None,
            "mute_similar_until": (
                format_ts(self.mute_similar_until_ts)
                if self.mute_similar_until_ts is not None
                else None
            ),
        }


_COLUMNS = (
    "e.event_id, e.stream, e.started_ts, e.ended_ts, e.reason, e.peak_score, e.top_channels, "
    "e.model_sha256, e.start_word, e.peak_word, e.start_sig, e.peak_sig, "
    "l.label, l.cause, l.labelled_by, l.labelled_ts, "
    "m.until_ts"
)
_FROM = (
    "FROM episode e LEFT JOIN label l ON l.event_id = e.event_id "
    "LEFT JOIN similar_mute m ON m.event_id = e.event_id"
)


def _episode(row: tuple[Any, ...]) -> Episode:
    event_id, stream, started, ended, reason, peak, channels, sha, start, peak_word = row[:10]
    start_sig, peak_sig, label, cause, by, labelled, mute_until = row[10:]
    return Episode(
        event_id,
        stream,
        started,
        ended,
        reason,
        peak,
        json.loads(channels),
        sha,
        unsigned(start),
        unsigned(peak_word),
        start_sig,
        peak_sig,
        label,
        cause,
        by,
        labelled,
        mute_until,
    )


class Journal:
    """Episodes and labels in one SQLite file; safe to use from several threads."""

    def __init__(self, path: Path, *, max_events: int = MAX_EVENTS) -> None:
        self.path = path
        self.max_events = max_events
        self._lock = threading.Lock()
        try:
            self._conn = _connect(path)
        except sqlite3.Error as exc:
            raise JournalError(
                f"{path}: cannot open the event journal ({exc}); move the file aside"
            ) from exc
        self._count = self._conn.execute("SELECT COUNT(*) FROM episode").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- main loop ---------------------------------------------------------------------------

    def record(
        self,
        event: Event,
        *,
        start_word: int | None,
        peak_word: int | None,
        start_sig: int | None = None,
        peak_sig: int | None = None,
    ) -> None:
        """Write an episode on its start, and again (its end and peak) when it ends."""
        started = _unix(event.started)
        ended = _unix(event.ended) if event.ended is not None else None
        channels = json.dumps([c.channel for c in event.top_channels])
        with self._lock:
            cursor = self._conn.execute(
                "INSERT INTO episode (event_id, stream, started_ts, ended_ts, reason, peak_score, "
                "top_channels, model_sha256, start_word, peak_word, start_sig, peak_sig) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO UPDATE SET "
                "ended_ts = excluded.ended_ts, reason = excluded.reason, "
                "peak_score = excluded.peak_score, top_channels = excluded.top_channels, "
                "peak_word = excluded.peak_word, peak_sig = excluded.peak_sig",
                (
                    event.event_id,
                    event.stream,
                    started,
                    ended,
                    event.reason,
                    event.peak_score,
                    channels,
                    event.model.sha256,
                    _signed(start_word),
                    _signed(peak_word),
                    start_sig,
                    peak_sig,
                ),
            )
            if cursor.rowcount and ended is None:
                self._count += 1
                if self._count > self.max_events:
                    self._prune()

    def _prune(self) -> None:
        excess = self._count - int(self.max_events * 0.9)
        self._conn.execute(
            "DELETE FROM episode WHERE id IN (SELECT id FROM episode WHERE event_id NOT IN "
            "(SELECT event_id FROM label) ORDER BY id LIMIT ?)",
            (excess,),
        )
        self._count = self._conn.execute("SELECT COUNT(*) FROM episode").fetchone()[0]

    # -- op threads --------------------------------------------------------------------------

    def label(
        self,
        event_id: str,
        label: Label,
        *,
        cause: str | None = None,
        by: str | None = None,
        at_ts: float | None = None,
    ) -> Episode | None:
        """Label an episode (replacing an earlier label); None: no such episode."""
        at = time.time() if at_ts is None else at_ts
        with self._lock:
            known = self._conn.execute(
                "SELECT 1 FROM episode WHERE event_id = ?", (event_id,)
            ).fetchone()
            if known is None:
                return None
            self._conn.execute(
                "INSERT OR REPLACE INTO label (event_id, label, cause, labelled_by, labelled_ts) "
                "VALUES (?, ?, ?, ?, ?)",
                (event_id, label, cause, by, at),
            )
        return self.get(event_id)

    def mute_similar(self, event_id: str, until_ts: float | None) -> None:
        """Hold back alarms like this episode until then (None: no longer)."""
        with self._lock:
            if until_ts is None:
                self._conn.execute("DELETE FROM similar_mute WHERE event_id = ?", (event_id,))
            else:
                self._conn.execute(
                    "INSERT OR REPLACE INTO similar_mute (event_id, until_ts) VALUES (?, ?)",
                    (event_id, until_ts),
                )

    def similar_mutes(self, now_ts: float) -> dict[str, float]:
        """The mutes of similar episodes still in force: event id -> until (wall clock)."""
        with self._lock:
            self._conn.execute("DELETE FROM similar_mute WHERE until_ts <= ?", (now_ts,))
            rows = self._conn.execute("SELECT event_id, until_ts FROM similar_mute").fetchall()
        return {event_id: float(until) for event_id, until in rows}

    def get(self, event_id: str) -> Episode | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} {_FROM} WHERE e.event_id = ?", (event_id,)
            ).fetchone()
        return _episode(row) if row is not None else None

    def episodes(
        self, *, label: str | None = None, stream: str | None = None, limit: int = 100
    ) -> list[Episode]:
        """Newest first; `label` is a label, "none" (unlabelled) or None (any)."""
        where, args = [], []
        if label == "none":
            where.append("l.label IS NULL")
        elif label is not None:
            where.append("l.label = ?")
            args.append(label)
        if stream is not None:
            where.append("e.stream = ?")
            args.append(stream)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} {_FROM} {clause} ORDER BY e.started_ts DESC, e.id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_episode(r) for r in rows]

    def labels_of(self, event_ids: list[str]) -> dict[str, tuple[Label, str | None]]:
        """The labels of those episodes that have one."""
        if not event_ids:
            return {}
        marks = ",".join("?" * len(event_ids))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT event_id, label, cause FROM label WHERE event_id IN ({marks})", event_ids
            ).fetchall()
        return {event_id: (label, cause) for event_id, label, cause in rows}

    def label_counts(self) -> dict[Label, int]:
        with self._lock:
            rows = dict(
                self._conn.execute("SELECT label, COUNT(*) FROM label GROUP BY label").fetchall()
            )
        return {name: int(rows.get(name, 0)) for name in LABELS}


@dataclass(frozen=True, slots=True)
class LabelledPeriod:
    """A labelled episode's stream and data-time span, for `oteo retrain`."""

    stream: str
    start_ts: float
    end_ts: float | None  # None: the episode had not ended when the journal was copied
    label: Label
    cause: str | None
    event_id: str


def read_labelled(path: Path) -> list[LabelledPeriod]:
    """Every labelled episode of a journal file (read-only), oldest first."""
    if not path.is_file():
        raise JournalError(f"{path}: no such event journal (the daemon writes it in state_dir)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            rows = conn.execute(
                "SELECT e.stream, e.started_ts, e.ended_ts, l.label, l.cause, e.event_id "
                "FROM label l JOIN episode e ON e.event_id = l.event_id ORDER BY e.started_ts"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: not an oteo event journal ({exc})") from exc
    return [LabelledPeriod(*row) for row in rows]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    return conn


def _unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _signed(word: int | None) -> int | None:
    """SQLite integers are signed 64-bit: a 64-bit word is stored as its two's complement."""
    if word is None:
        return None
    return word - (1 << 64) if word >= 1 << 63 else word


def unsigned(word: int | None) -> int | None:
    """The inverse of `_signed`."""
    if word is None:
        return None
    return word + (1 << 64) if word < 0 else word
