"""Per-stream state owned by the main loop: window buffer, detector, the alarm it is in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.aligner import ChannelAligner
from daemon.detector import Detector
from daemon.messages import SeenBefore, StateName
from daemon.window import StreamBuffer


@dataclass
class Peak:
    """The window with the highest score of an alarm: who caused it is read from here."""

    score: float
    ts: float
    channel_score: np.ndarray  # [C]
    observed: np.ndarray  # [C] newest sample of the window, raw units
    expected: np.ndarray  # [C] its reconstruction
    word: int | None = None  # its hash bits (recorded streams of a model that hashes)
    sig: int | None = None  # its residual signature (daemon/signature.py)


@dataclass
class Alarm:
    """The alarm a stream is in: one event id from start to end."""

    event_id: str
    started_ts: float
    peak: Peak
    last_update_ts: float
    published: bool = False  # its start event went out (not while the stream was muted)
    start_word: int | None = None  # hash bits of the window that started it
    start_sig: int | None = None  # its residual signature: compared with earlier episodes
    # The earlier episodes its start window resembles (None: not searched).
    seen_before: list[SeenBefore] | None = None
    # The false-alarm episode whose mute of similar episodes holds this one back (not announced).
    suppressed_by: str | None = None

    @classmethod
    def begin(cls, peak: Peak) -> Alarm:
        return cls(
            uuid.uuid4().hex, peak.ts, peak, peak.ts, start_word=peak.word, start_sig=peak.sig
        )

    def observe(self, peak: Peak) -> None:
        """Keep the window if it is the highest of the alarm so far."""
        if peak.score > self.peak.score:
            self.peak = peak


@dataclass
class Stream:
    """Everything the daemon knows about one stream."""

    id: str
    buffer: StreamBuffer
    detector: Detector
    aligner: ChannelAligner | None = None
    state: StateName = "warming_up"
    state_since_ts: float = 0.0
    last_seen: float = 0.0  # monotonic time of the last accepted reading
    last_ts: float = 0.0  # data time of the last accepted reading
    muted_until: float = 0.0  # monotonic
    alarm: Alarm | None = None
    last_score: float | None = None
    last_threshold: float = 0.0  # the enter threshold last exported (it may move)
    late_run: int = 0  # consecutive readings dropped as late
    # This stream's oteo_stream_score / _threshold series, looked up once: labels() per window
    # is costly.
    score_metric: Any = None
    threshold_metric: Any = None
    readings_metric: Any = None
    windows_metric: Any = None
    partition: int = -1  # the partition session its readings come on (-1: none)
    rescore_until_ts: float = 0.0  # readings up to here were scored before an unclean restart


def new_buffer(
    *, window: int, channels: int, period_s: float, hop: int, max_gap_s: float, reorder_s: float
) -> StreamBuffer:
    """An empty window buffer for one stream."""
    return StreamBuffer(
        window,
        channels,
        hop=hop,
        period_s=period_s,
        max_gap_s=max_gap_s,
        reorder_tolerance_s=reorder_s,
    )


def top_contributions(
    channel_score: np.ndarray, channel_q99: np.ndarray, count: int = 3
) -> list[tuple[int, float, float]]:
    """(channel index, share of the normalised error, normalised score), largest first."""
    normalised = channel_score / np.maximum(channel_q99, 1e-12)
    total = float(normalised.sum())
    order = np.argsort(-normalised)[:count]
    return [
        (int(c), float(normalised[c] / total) if total > 0 else 0.0, float(normalised[c]))
        for c in order
    ]
