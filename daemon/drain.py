"""The main loop's intake side: queued messages into the engine, with errors contained.

`Drain.run` takes queued `Work` from the intake and hands each to the recorder and the engine,
scoring the batch whenever the queue runs dry. It returns after a slice of time under
sustained load, so the loop keeps ticking. An unexpected error on one item is counted
(`oteo_errors_total{stage}`), logged at most once a minute with its traceback, and the item
dropped: one bad message never stops the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from daemon.engine import Engine
from daemon.intake import Intake, Work
from daemon.metrics import Metrics
from daemon.recorder import Recorder
from daemon.throttle import Throttle

log = logging.getLogger(__name__)

DRAIN_SLICE_S = 0.25  # longest the loop handles readings before it ticks


class Drain:
    """Moves queued work into the engine; see the module docstring."""

    def __init__(
        self,
        intake: Intake,
        engine: Engine,
        metrics: Metrics,
        *,
        wake: Callable[[], None],
        recorder: Recorder | None = None,
    ) -> None:
        self.intake = intake
        self.engine = engine
        self.metrics = metrics
        self.recorder = recorder
        self._wake = wake  # room in the queue: let held-back QoS 1 messages in
        self._logs = {stage: Throttle() for stage in ("engine", "scoring")}
        self.depth_peak = 0  # deepest queue seen since the gauge last read it
        self.noted: Callable[[Work], None] | None = None  # told of every item handled

    def run(self, timeout_s: float, until_empty: bool = False) -> None:
        """Handle queued readings; score when the queue runs dry or a batch is full."""
        work = self.intake.take(timeout_s)
        if work is None:
            self.guarded("scoring", self.engine.score_pending)
            return
        # The gauge shows the deepest point since its last refresh: sampled only when idle,
        # it would read 0 just after every drain.
        self.depth_peak = max(self.depth_peak, self.intake.queue.qsize() + 1)
        deadline = time.monotonic() + DRAIN_SLICE_S
        handled = 0
        while work is not None:
            self._handle(work)
            handled += 1
            if handled % 64 == 0:
                self._wake()
                if not until_empty and time.monotonic() >= deadline:
                    # Under sustained load the queue never runs dry: return anyway so the loop
                    # keeps ticking (stale streams, alarm timers, gauges, the watchdog).
                    self.depth_peak = max(self.depth_peak, self.intake.queue.qsize())
                    break
            work = self.intake.take(0.0)
            if work is None:
                self.guarded("scoring", self.engine.score_pending)
                self._wake()
                if until_empty:
                    work = self.intake.take(0.0)
        self.guarded("scoring", self.engine.score_pending)

    def guarded(self, stage: str, action: Callable[[], object]) -> None:
        """Run `action`; an exception is counted and logged, never raised."""
        try:
            action()
        except Exception:
            self._failed(stage, stage)

    def _handle(self, work: Work) -> None:
        try:
            taken = self.engine.handle(work)
        except Exception:
            self.metrics.messages_total.labels(result="internal_error").inc()
            self._failed("engine", f"stream {work.stream!r}")
            taken = False
        if taken and self.recorder is not None:
            self.recorder.record(work)
        if self.noted is not None:
            self.noted(work)

    def _failed(self, stage: str, what: str) -> None:
        self.metrics.errors_total.labels(stage=stage).inc()
        if self._logs[stage].ready():
            log.exception("%s failed (%s); the item is dropped and the daemon goes on", stage, what)
