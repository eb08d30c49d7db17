"""Per-stream detection state saved in `state_dir`, so a restart does not start every stream cold.

What a stream has learnt — its detector's baseline and thresholds, the alarm it is in (event id,
start, peak) — is written to `state_dir/streams.json` at shutdown and every few minutes (one
atomic file replace), and read back at start-up. It belongs to one model: a file saved under
another model's sha256 is ignored (with a log line), since baselines of errors of one model say
nothing about another's. Streams come back lazily, when their first reading arrives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "streams.json"
SCHEMA = 1
SAVE_EVERY_S = 300.0


class StreamMemory:
    """Reads and writes the saved stream states of one state directory."""

    def __init__(self, state_dir: Path, model_sha256: str) -> None:
        self.path = state_dir / FILE_NAME
        self.model_sha256 = model_sha256
        self.next_save = time.monotonic() + SAVE_EVERY_S

    def load(self) -> dict[str, dict[str, Any]]:
        """The saved states by stream id; empty if there are none for this model."""
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

    def save(self, streams: dict[str, dict[str, Any]]) -> None:
        """Replace the file with these states (atomically); a failure is logged, not raised."""
        doc = {
            "schema": SCHEMA,
            "model_sha256": self.model_sha256,
            "saved": time.time(),
            "streams": streams,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save stream states to %s: %s", self.path, exc)
        self.next_save = time.monotonic() + SAVE_EVERY_S
