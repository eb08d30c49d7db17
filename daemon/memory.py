"""Per-stream detection state saved in `state_dir`, so a restart does not start every stream cold.

What a stream has learnt — its detector's baseline and smoothing, the alarm it is in (event id,
start, peak) — is written to `state_dir/streams.json` at shutdown and every few minutes (one
atomic file replace) and read back at start-up. It belongs to one model: a file saved under
another model's sha256 is ignored (with a log line), since baselines of one model's errors say
nothing about another's. A stream comes back when its first reading arrives; an alarm it was in
is then still the same alarm (same event id), so its end is reported as usual. A mute does not
survive a restart.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.detector import SnapshotError
from daemon.stream import Alarm, Peak, Stream

log = logging.getLogger(__name__)

FILE_NAME = "streams.json"
SCHEMA = 1
SAVE_EVERY_S = 300.0


class StreamMemory:
    """The saved states of one state directory's streams, for the model being served."""

    def __init__(self, state_dir: Path, model_sha256: str) -> None:
        self.path = state_dir / FILE_NAME
        self.model_sha256 = model_sha256
        self.next_save = time.monotonic() + SAVE_EVERY_S
        self._saved: dict[str, dict[str, Any]] = {}

    def load(self) -> int:
        """Read the file; returns how many streams it holds for this model."""
        self._saved = self._read()
        if self._saved:
            log.info("%d streams' saved states will be taken up as they report", len(self._saved))
        return len(self._saved)

    def use_model(self, sha256: str) -> None:
        """Another model from now on: states saved for the previous one are of no use."""
        if sha256 != self.model_sha256:
            self.model_sha256, self._saved = sha256, {}

    def revive(self, stream: Stream) -> bool:
        """Give a new stream what it had learnt before the restart; False if nothing was saved."""
        doc = self._saved.pop(stream.id, None)
        return doc is not None and restore_stream(stream, doc)

    def save(self, streams: Iterable[Stream], limit: int) -> None:
        """Replace the file with these streams' states (atomically), then those saved before
        that have not reported since, up to `limit` streams; failures are logged."""
        states = {s.id: stream_doc(s) for s in streams}
        for stream_id, doc in self._saved.items():
            if len(states) >= limit:
                break
            states.setdefault(stream_id, doc)
        doc = {
            "schema": SCHEMA,
            "model_sha256": self.model_sha256,
            "saved": time.time(),
            "streams": states,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save stream states to %s: %s", self.path, exc)
        self.next_save = time.monotonic() + SAVE_EVERY_S

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): every stream starts afresh", self.path, exc)
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            log.warning("%s has an unknown layout: every stream starts afresh", self.path)
            return {}
        if doc.get("model_sha256") != self.model_sha256:
            log.info("saved stream states belong to another model: every stream starts afresh")
            return {}
        streams = doc.get("streams")
        return streams if isinstance(streams, dict) else {}


def restore_stream(stream: Stream, doc: dict[str, Any]) -> bool:
    """Give `stream` the detector and alarm of a `stream_doc`; False (logged) if unusable."""
    try:
        stream.detector.restore(doc["detector"])
        stream.alarm = _alarm_from(doc.get("alarm"))
    except (SnapshotError, KeyError, TypeError, ValueError) as exc:
        log.warning("stream %s: saved state not used (%s)", stream.id, exc)
        return False
    if stream.alarm is not None and stream.alarm.published:
        stream.state, stream.state_since_ts = "anomalous", stream.alarm.started_ts
    return True


def stream_doc(stream: Stream, *, moving: bool = True) -> dict[str, Any]:
    """What a stream has learnt (detector, alarm), JSON-able; `moving=False` leaves out the
    detector's baseline buffers (`Detector.snapshot`)."""
    alarm = stream.alarm
    doc: dict[str, Any] = {"detector": stream.detector.snapshot(moving=moving), "alarm": None}
    if alarm is not None:
        p = alarm.peak
        doc["alarm"] = {
            "event_id": alarm.event_id,
            "started_ts": alarm.started_ts,
            "last_update_ts": alarm.last_update_ts,
            "published": alarm.published,
            "peak": [p.score, p.ts, p.channel_score.tolist(), p.observed.tolist(),
                     p.expected.tolist()],
            "peak_word": p.word,
            "start_word": alarm.start_word,
            "suppressed_by": alarm.suppressed_by,
        }  # fmt: skip
    return doc


def _alarm_from(doc: Any) -> Alarm | None:
    if doc is None:
        return None
    score, ts, channel_score, observed, expected = doc["peak"]
    cs, obs, exp = (np.asarray(a, dtype=np.float64) for a in (channel_score, observed, expected))
    peak = Peak(float(score), float(ts), cs, obs, exp, _word(doc.get("peak_word")))
    alarm = Alarm(
        str(doc["event_id"]),
        float(doc["started_ts"]),
        peak,
        float(doc["last_update_ts"]),
        start_word=_word(doc.get("start_word")),
    )
    suppressed_by = doc.get("suppressed_by")
    alarm.suppressed_by = suppressed_by if isinstance(suppressed_by, str) else None
    alarm.published = bool(doc["published"])
    return alarm


def _word(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value >= 0 else None
