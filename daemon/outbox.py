"""A bounded on-disk queue of events the broker has not acknowledged yet.

Events go in before they are published and come out when the broker acknowledges them, so a
broker outage or a daemon restart does not lose them. One SQLite file in the state directory.
Full: the oldest events are dropped and counted. A corrupt file is moved aside, never trusted.

Only the MQTT network thread uses an `Outbox` (it may be created on another thread during
start-up), so there is no locking.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    -- AUTOINCREMENT: ids are never reused, even after every event was acknowledged and the
    -- daemon restarted, so an id held by the publisher always means the same event.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_total', 0);
"""

# "file is not a database" and "database disk image is malformed": the file cannot be trusted.
# Other errors (permissions, disk full, I/O) say nothing about the file and are not "corrupt".
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

# A writer in another process (an operator inspecting the file) may hold the lock briefly; the
# network thread must not stall longer than this for it.
_BUSY_TIMEOUT_S = 1.0


class OutboxError(RuntimeError):
    """The outbox cannot store or read events (disk full, read-only, I/O error)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored event, as it will be published."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Outbox:
    """Events waiting for the broker's acknowledgement, oldest first, bounded by count and bytes.

    `max_bytes` caps the payload bytes; the file is larger by SQLite's per-row overhead.
    """

    def __init__(self, path: Path, *, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be at least 1")
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._dropped = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create {path.parent}: {exc.strerror}") from exc
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
            aside = _move_aside(path)
            logger.error("outbox %s is corrupt (%s); moved to %s, starting empty", path, exc, aside)
            try:
                self._open()
            except sqlite3.Error as exc2:
                raise OutboxError(f"cannot create outbox {path}: {exc2}") from exc2

    def _open(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: opened
        # at start-up, then used by the network thread alone (never two threads at once).
        db = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            # WAL + synchronous=NORMAL: every commit is written to the WAL file before add()
            # returns, so a crash of this process loses nothing (the data is in the OS page
            # cache) and another process opening the file sees every committed event. The WAL is
            # only fsync'ed at checkpoints, so a power cut or kernel crash may lose the most
            # recent events (those the kernel had not written back yet, typically the last
            # second or few), but never corrupts the file. Events are rare and a power cut takes
            # the machine down with the daemon; an fsync per event is not worth its flash wear.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            # Reads every page once (milliseconds for a few MB): a damaged file is caught now,
            # not halfway through a flush.
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.executescript(_SCHEMA)
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM event"
            ).fetchone()
            (dropped_total,) = db.execute(
                "SELECT value FROM meta WHERE key = 'dropped_total'"
            ).fetchone()
        except BaseException:
            db.close()
            raise
        self._db = db
        self._count: int = count
        self._bytes: int = size
        self._dropped_total: int = dropped_total

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back by itself (it does on a full disk).
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("outbox rollback failed")
            raise

    def add(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Store one event and return its id; the oldest events make room if the outbox is full.

        Raises OutboxError when SQLite fails (disk full, read-only) or when the payload alone
        is larger than `max_bytes`; nothing is stored or dropped then.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        size = len(payload)
        if size > self.max_bytes:
            raise OutboxError(f"event of {size} bytes is larger than the outbox ({self.max_bytes})")
        try:
            with self._transaction():
                dropped, dropped_bytes = self._make_room(size)
                cursor = self._db.execute(
                    "INSERT INTO event (topic, payload, qos, retain, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), time.time()),
                )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot store event for {topic}: {exc}") from exc
        # Counters change only once the transaction is committed.
        self._count += 1 - dropped
        self._bytes += size - dropped_bytes
        self._dropped += dropped
        self._dropped_total += dropped
        entry_id = cursor.lastrowid
        assert entry_id is not None  # an INSERT always sets it
        return entry_id

    def _make_room(self, size: int) -> tuple[int, int]:
        """Delete the oldest events so one more of `size` bytes fits; returns (events, bytes)."""
        excess_events = self._count + 1 - self.max_events
        excess_bytes = self._bytes + size - self.max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return 0, 0
        dropped = dropped_bytes = 0
        last_id: int | None = None
        rows = self._db.execute("SELECT id, length(payload) FROM event ORDER BY id")
        for row_id, length in rows:
            last_id = row_id
            dropped += 1
            dropped_bytes += length
            if dropped >= excess_events and dropped_bytes >= excess_bytes:
                break
        rows.close()
        if last_id is not None:
            self._db.execute("DELETE FROM event WHERE id <= ?", (last_id,))
            self._db.execute(
                "UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (dropped,)
            )
            if self._dropped == 0:  # once per open: a long outage would flood the log
                logger.warning(
                    "outbox full (%d events, %d bytes): dropping the oldest events; further "
                    "drops are counted, not logged",
                    self._count,
                    self._bytes,
                )
        return dropped, dropped_bytes

    def next_after(self, after_id: int, limit: int) -> list[Entry]:
        """Up to `limit` events with ids above `after_id`, oldest first."""
        try:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created FROM event"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot read outbox: {exc}") from exc
        return [Entry(i, t, p, q, bool(r), c) for i, t, p, q, r, c in rows]

    def ack(self, entry_id: int) -> None:
        """Forget an event the broker acknowledged; an unknown id is a no-op."""
        try:
            # Two primary-key lookups (O(log n)); RETURNING would need SQLite >= 3.35, newer
            # than some edge distributions ship.
            with self._transaction():
                row = self._db.execute(
                    "SELECT length(payload) FROM event WHERE id = ?", (entry_id,)
                ).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM event WHERE id = ?", (entry_id,))
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot acknowledge event {entry_id}: {exc}") from exc
        if row is not None:
            self._count -= 1
            self._bytes -= row[0]

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Payload bytes pending."""
        return self._bytes

    @property
    def dropped(self) -> int:
        """Events dropped to make room since this outbox was opened."""
        return self._dropped

    @property
    def dropped_total(self) -> int:
        """Events dropped to make room over the file's whole life (kept across restarts)."""
        return self._dropped_total

    def close(self) -> None:
        """Close the file (the last connection to close checkpoints and removes the WAL)."""
        self._db.close()


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by us (quick_check) rather than by SQLite
        return not isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in _CORRUPT_CODES  # extended codes keep the primary code in the low byte


def _move_aside(path: Path) -> Path:
    """Rename a corrupt outbox (and its WAL and shared-memory files) to path.corrupt-<ts>."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                # A WAL left beside a fresh file would be replayed into it.
                companion.rename(aside.with_name(aside.name + suffix))
    except OSError as exc:
        raise OutboxError(f"cannot move corrupt outbox {path} aside: {exc.strerror}") from exc
    return aside
