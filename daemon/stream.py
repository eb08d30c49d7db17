"""Per-stream state owned by the main loop: window buffer, alarm tracker, published state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.alarm import AlarmTracker
from daemon.aligner import ChannelAligner
from daemon.manifest import AlarmPolicy
from daemon.messages import StateName
from daemon.window import StreamBuffer


@dataclass
class Alarm:
    """The alarm a stream is in: one event id from start to end."""

    event_id: str
    started_ts: float
    peak: float
    last_update_ts: float
    published: bool = False  # its start event went out (not while the stream was muted)

    @classmethod
    def begin(cls, ts: float, score: float) -> Alarm:
        return cls(uuid.uuid4().hex, ts, score, ts)


@dataclass
class Stream:
    """Everything the daemon knows about one stream."""

    id: str
    buffer: StreamBuffer
    tracker: AlarmTracker
    aligner: ChannelAligner | None = None
    state: StateName = "warming_up"
    state_since_ts: float = 0.0
    last_seen: float = 0.0  # monotonic time of the last accepted reading
    last_ts: float = 0.0  # data time of the last accepted reading
    last_seq: int | None = None
    muted_until: float = 0.0  # monotonic
    alarm: Alarm | None = None
    last_score: float | None = None
    pending_windows: int = 0  # windows queued for scoring, not yet scored
    late_run: int = 0  # consecutive readings dropped as late
    # This stream's oteo_stream_score series, looked up once: labels() per window is costly.
    score_metric: Any = None
    extra: dict[str, float] = field(default_factory=dict)


def new_stream(
    stream_id: str,
    *,
    window: int,
    channels: int,
    period_s: float,
    policy: AlarmPolicy,
    sensitivity: float,
    max_gap_s: float,
    reorder_tolerance_s: float,
    now: float,
) -> Stream:
    buffer = StreamBuffer(
        window,
        channels,
        hop=policy.hop,
        period_s=period_s,
        max_gap_s=max_gap_s,
        reorder_tolerance_s=reorder_tolerance_s,
    )
    return Stream(
        id=stream_id,
        buffer=buffer,
        tracker=AlarmTracker(policy, sensitivity),
        last_seen=now,
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
