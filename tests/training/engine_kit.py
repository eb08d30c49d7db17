"""Play series through the daemon's own Engine in-process, recording them (and journalling the
events) as the daemon would: recordings for `oteo retrain` tests without a broker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import load_config
from daemon.engine import Engine
from daemon.intake import Work, new_layout
from daemon.journal import FILE_NAME as JOURNAL_FILE
from daemon.journal import Journal
from daemon.messages import Event
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.reading import ParsedReading
from daemon.recorder import MAX_PENDING_BATCHES, Recorder
from daemon.recording import FILE_NAME


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Played:
    events: list[dict[str, Any]]
    t0: float
    store: Path | None


def play(model: Model, series: list[np.ndarray], state_dir: Path | None, t0: float) -> Played:
    """Feed streams pump-1.. (1 s apart from t0) to a real Engine; record them if `state_dir`."""
    cfg = load_config(
        None,
        {
            "model.path": str(model.path),
            "state_dir": str(state_dir or "."),
            "instance": "t",
            "record.streams": ["pump-*"],
        },
    )
    metrics, clock = Metrics(), Clock()
    events: list[dict[str, Any]] = []

    def publish(out: Any) -> None:
        if isinstance(out, Event):
            events.append(json.loads(out.to_json()))

    engine = Engine(model, cfg, publish, metrics, clock=clock)
    journal = Journal(state_dir / JOURNAL_FILE) if state_dir else None
    engine.episodes.journal = journal
    layout = new_layout(model.manifest.channels)
    recorder = Recorder(cfg.record, state_dir, metrics) if state_dir else None
    if recorder:
        recorder.use_layout(model.manifest.channels, model.manifest.sample_period_s)
    for i in range(0, len(series[0]), 50):
        for k, values in enumerate(series, start=1):
            rows = values[i : i + 50]
            readings = [ParsedReading(t0 + i + j, None, v) for j, v in enumerate(rows)]
            work = Work(f"pump-{k}", readings, layout, size=len(readings))
            if recorder:
                recorder.record(work)
            engine.handle(work)
        engine.score_pending()
        clock.now += 1.0  # a message a second of monotonic time: never stale
        engine.tick()
        if recorder:
            recorder.flush(engine.streams)
            # Played far faster than real time: give the writer time, as a second between
            # flushes would (it drops and counts readings when it falls behind).
            deadline = time.monotonic() + 30.0
            while recorder.backlog > MAX_PENDING_BATCHES // 2 and time.monotonic() < deadline:
                time.sleep(0.005)
    if recorder:
        recorder.close()
        assert metrics.recorder_dropped_total._value.get() == 0, "the recording lost readings"
    if journal:
        journal.close()
    return Played(events, t0, state_dir / FILE_NAME if state_dir else None)
