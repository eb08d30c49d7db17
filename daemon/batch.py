"""The micro-batch: windows cut from many streams, scored together in one onnxruntime call.

The engine queues a window the moment a stream makes it ready: it is copied into the next row
of one preallocated float32 block, so a batch needs no stacking. The batch is due when it is
full or its first window has waited `scoring.max_wait_s`; `run` empties it through the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.metrics import Metrics
from daemon.model import ScoreBatch, Scorer
from daemon.section import ScoringSection
from daemon.stream import Stream
from daemon.window import StreamBuffer


@dataclass(slots=True)
class Pending:
    """Whose a queued window is, the data time it ends at, and when its reading arrived."""

    stream: Stream
    ts: float
    arrival: float


class WindowBatch:
    """Up to `size` windows of one shape, in the order they were queued."""

    def __init__(
        self, size: int, window: int, channels: int, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.windows: npt.NDArray[np.float32] = np.empty((size, window, channels), np.float32)
        self.items: list[Pending] = []
        self.since = 0.0  # clock() when the first window was queued
        self._metrics = metrics
        self._clock = clock

    def __len__(self) -> int:
        return len(self.items)

    def due(self, now: float, scoring: ScoringSection) -> bool:
        """Windows are queued, and there are `max_batch` or the first waited `max_wait_s`."""
        return bool(self.items) and (
            len(self.items) >= scoring.max_batch or now - self.since >= scoring.max_wait_s
        )

    def add(self, buffer: StreamBuffer, back: int, item: Pending) -> None:
        """Queue the `back`-th newest window `buffer`'s last push or drain made ready."""
        if not self.items:
            self.since = self._clock()
        buffer.take_at(back, out=self.windows[len(self.items)])
        self.items.append(item)

    def forget(self, stream: Stream) -> None:
        """Drop the windows of a stream that is no longer tracked; the others keep their order."""
        kept = [i for i, p in enumerate(self.items) if p.stream is not stream]
        if len(kept) == len(self.items):
            return
        # Row i belongs to item i: the windows behind a dropped one move up with their items.
        self.windows[: len(kept)] = self.windows[kept]
        self.items = [self.items[i] for i in kept]

    def run(self, model: Scorer) -> tuple[list[Pending], npt.NDArray[np.float32], ScoreBatch]:
        """Empty the batch through the model: its items, their windows and the model's outputs.

        Row i of the windows (a view of the block, valid until the next `add`) and of the
        outputs belongs to item i.
        """
        items, self.items = self.items, []
        n = len(items)
        windows = self.windows[:n]
        t0 = time.perf_counter()
        out = model.run(windows)
        self._metrics.inference_duration_seconds.observe(time.perf_counter() - t0)
        self._metrics.batch_size_windows.observe(n)
        self._metrics.windows_scored_total.inc(n)
        return items, windows, out
