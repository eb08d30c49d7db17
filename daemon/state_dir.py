"""The state directory's stores, opened at start-up: the event outbox, the recording, the journal.

Each lives in `state_dir` (`$STATE_DIRECTORY` under systemd); one that cannot be opened stops
the start with a one-line StartupError naming the setting and what to do.
"""

from __future__ import annotations

import sqlite3

from daemon.config import Config
from daemon.journal import FILE_NAME as JOURNAL_FILE
from daemon.journal import Journal, JournalError
from daemon.manifest import Manifest
from daemon.metrics import Metrics
from daemon.outbox import Outbox, OutboxError
from daemon.recorder import Recorder
from daemon.startup import StartupError


def open_outbox(cfg: Config) -> Outbox:
    """The outbox of events the broker has not acknowledged yet; makes `state_dir`."""
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        return Outbox(
            cfg.state_dir / "outbox.sqlite3",
            max_events=cfg.outbox.max_events,
            max_bytes=cfg.outbox.max_bytes,
        )
    except (OSError, OutboxError) as exc:
        raise StartupError(
            f"state_dir: cannot use {cfg.state_dir} for the outbox ({exc}); "
            "make it writable or set state_dir"
        ) from exc


def open_recorder(cfg: Config, metrics: Metrics, manifest: Manifest) -> Recorder | None:
    """The recording of `record.streams`, laid out for the model's channels; None: no streams."""
    if not cfg.record.streams:
        return None
    try:
        recorder = Recorder(cfg.record, cfg.state_dir, metrics)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(
            f"record: cannot use {cfg.state_dir} for the recording ({exc}); "
            "make it writable or set state_dir"
        ) from exc
    recorder.use_layout(manifest.channels, manifest.sample_period_s)
    return recorder


def open_journal(cfg: Config) -> Journal:
    """The journal of alarm episodes and their labels."""
    try:
        return Journal(cfg.state_dir / JOURNAL_FILE)
    except JournalError as exc:  # one line naming the file and what to do
        raise StartupError(f"state_dir: {exc}") from exc
