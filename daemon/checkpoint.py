"""A partition's checkpoint: the state of its streams, so the partition resumes where it was.

`checkpoint_dir/<k>.json` (default `state_dir/partitions`) holds, per stream of partition k, the
newest window's samples and the grid's phase (`StreamBuffer.snapshot`), the seq and time of the
newest reading, and its alarm and detector state (`daemon.memory.stream_doc`) without the
detector's baseline buffers: those (tens of kB per stream, slow to change) go to
`<k>.baselines.json`, rewritten about once a minute and at a clean stop.
It is replaced atomically (temporary file, fsync, rename), and its mtime is touched about once a
second while the partition is held: the last sign of life of the run that held it. At a clean
stop it is written once more with `clean: true` and how many delivered messages were left
unacknowledged. State directories are not shared across boxes: a partition that moves to another
box starts its windows cold there (a warm-up of one window), unless `checkpoint_dir` is on
storage both see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.memory import stream_doc
from daemon.stream import Stream
from daemon.window_state import snapshot_window

log = logging.getLogger(__name__)

SCHEMA = 1


@dataclass
class Saved:
    """A checkpoint as read back."""

    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    clean: bool = True  # the run that wrote it stopped cleanly (or there was no file)
    unacked: int = 0  # messages it left delivered but unacknowledged
    alive: float = 0.0  # wall time of its last sign of life (the file's mtime)


class Checkpoint:
    """One partition's checkpoint file; stream docs are cached and redone only when changed."""

    def __init__(self, directory: Path, partition: int, count: int, model_sha256: str) -> None:
        self.path = directory / f"{partition}.json"
        # The detectors' baseline buffers: large and slow to change, so written far less often.
        self.moving_path = directory / f"{partition}.baselines.json"
        # How far each stream got since the checkpoint (the heartbeat writes it, no fsync).
        self.progress_path = directory / f"{partition}.progress.json"
        self.partition = partition
        self.count = count
        self.model_sha256 = model_sha256
        self._docs: dict[str, str] = {}  # stream id -> its JSON text at the last write

    def read(self) -> Saved:
        """The saved state (empty if there is none or it belongs to another model)."""
        try:
            text = self.path.read_text(encoding="utf-8")
            alive = self.path.stat().st_mtime
        except FileNotFoundError:
            return Saved()
        except OSError as exc:
            log.warning("partition %d: %s unreadable (%s)", self.partition, self.path, exc)
            return Saved(clean=False, alive=time.time())
        try:
            doc = json.loads(text)
            clean, unacked = bool(doc["clean"]), int(doc["unacked"])
            streams = doc["streams"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("partition %d: %s unreadable (%s)", self.partition, self.path, exc)
            return Saved(clean=False, alive=alive)
        if doc.get("schema") != SCHEMA or doc.get("model_sha256") != self.model_sha256:
            log.info("partition %d: checkpoint of another model: cold start", self.partition)
            streams = {}
        elif doc.get("count") != self.count:
            # Another partition count maps other streams here: theirs start cold (one window).
            log.info("partition %d: checkpoint of another count: cold start", self.partition)
            streams = {}
        moving = self._read_moving() if streams else {}
        for stream_id, state in moving.items():
            detector = streams.get(stream_id, {}).get("detector")
            if isinstance(detector, dict) and isinstance(state, dict):
                detector.update(state)
        return Saved(streams, clean, unacked, alive)

    def write(self, streams: list[Stream], *, clean: bool = False, unacked: int = 0) -> None:
        """Replace the file with these streams' states (OSError if it cannot be written)."""
        _write_atomically(self.path, self.render(streams, clean=clean, unacked=unacked))

    def render(
        self,
        streams: list[Stream],
        *,
        clean: bool = False,
        unacked: int = 0,
        tracked: Container[str] | None = None,
    ) -> str:
        """The file's text: these streams' states now, and the others' as last rendered
        (those not `tracked` any more, e.g. evicted, are left out)."""
        docs = self._docs
        if tracked is not None:
            for gone in [sid for sid in docs if sid not in tracked]:
                del docs[gone]
        for stream in streams:
            docs[stream.id] = json.dumps(_doc(stream), separators=(",", ":"))
        head = {
            "schema": SCHEMA,
            "partition": self.partition,
            "count": self.count,
            "model_sha256": self.model_sha256,
            "saved": time.time(),
            "clean": clean,
            "unacked": unacked,
        }
        body = ",".join(f"{json.dumps(sid)}:{text}" for sid, text in docs.items())
        return json.dumps(head, separators=(",", ":"))[:-1] + ',"streams":{' + body + "}}"

    def write_moving(self, streams: list[Stream]) -> None:
        """Replace the file of the streams' baseline buffers (OSError if it cannot)."""
        _write_atomically(self.moving_path, self.moving(streams)())

    def moving(self, streams: list[Stream]) -> Callable[[], str]:
        """The baselines file's text, to render later in any thread (the snapshots are taken
        now and belong to nobody else)."""
        doc = {
            "schema": SCHEMA,
            "model_sha256": self.model_sha256,
            "streams": {s.id: _moving(s) for s in streams},
        }
        return lambda: json.dumps(doc, separators=(",", ":"))

    def _read_moving(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.moving_path.read_text(encoding="utf-8"))
            if doc["schema"] == SCHEMA and doc["model_sha256"] == self.model_sha256:
                return dict(doc["streams"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("partition %d: %s unreadable (%s)", self.partition, self.moving_path, exc)
        return {}

    def write_progress(self, last_ts: dict[str, float]) -> None:
        """Note how far streams got since the checkpoint (best effort, errors ignored): after
        a crash, the readings between the two are scored a second time, and counted."""
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(last_ts, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.progress_path)

    def read_progress(self) -> dict[str, float]:
        """Streams' last timestamps as the dead run's last heartbeat saw them ({} if none)."""
        try:
            doc = json.loads(self.progress_path.read_text(encoding="utf-8"))
            return {str(k): float(v) for k, v in doc.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def forget(self, stream_id: str) -> None:
        """Leave an evicted stream out of the next write."""
        self._docs.pop(stream_id, None)

    def touch(self) -> None:
        """Mark the partition as still held (the file's mtime); errors are ignored."""
        with contextlib.suppress(OSError):
            os.utime(self.path)


class FileWriter:
    """Writes files (atomically, fsynced) in a thread of its own, so that the main loop never
    waits for the disk; `done(ok)` is called in that thread after each write."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Path, Callable[[], str], Callable[[bool], None]] | None]
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, path: Path, text: Callable[[], str], done: Callable[[bool], None]) -> None:
        self._queue.put((path, text, done))

    def flush(self) -> None:
        """Wait until every submitted file is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30.0)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            path, text, done = item
            try:
                _write_atomically(path, text())
                ok = True
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
                ok = False
            try:
                done(ok)
            except Exception:
                log.exception("after writing %s", path)
            self._queue.task_done()
        self._queue.task_done()


def _doc(stream: Stream) -> dict[str, Any]:
    doc = stream_doc(stream, moving=False)
    return {"window": snapshot_window(stream.buffer), "last_ts": stream.last_ts, **doc}


def _moving(stream: Stream) -> dict[str, Any]:
    snapshot = stream.detector.snapshot()
    keys = ("baseline", "new_level", "episode")
    return {key: snapshot[key] for key in keys}


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
