"""Simulated pump streams with repeated faults, their codes and the alarm episodes the daemon's
detector finds in them: the data behind `oteo benchmark similar`.

A repeated fault keeps its signature: every fault of one kind hits the same channels (chosen
once per kind from the seed), as a recurring fault of one machine build would; its sign, size,
timing and the operating point it meets are drawn afresh each time (training/fault.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.detector import Stages, replay
from daemon.model import Model
from training.fault import FAULT_KINDS, inject
from training.simulator import CHANNELS, DEFAULT_START_TIME, MachineSimulator, reference_scales

BATCH = 8192  # windows per onnxruntime run
WARM_UP_S = 2400  # no fault before the detector's trailing threshold has filled (2100 samples)


@dataclass(frozen=True)
class Fault:
    """One injected fault: its kind and rows [start, stop)."""

    kind: str
    start: int
    stop: int


@dataclass
class Stream:
    """One simulated stream: its values, faults, and (once encoded) its windows' outputs."""

    name: str
    start_time: float  # unix s of row 0
    values: np.ndarray  # [T, C] float64, CHANNELS order
    faults: list[Fault]
    window: int = 0  # the model's window: window i ends at row i + window - 1
    score: np.ndarray | None = None  # [N] the detector's smoothed score
    active: np.ndarray | None = None  # [N] bool, in alarm after window i
    code: np.ndarray | None = None  # [N, K] float32, the model's continuous code
    # [N, C] float32: each channel's mean of (observed - reconstruction) / channel scale
    residual: np.ndarray | None = None
    channel_score: np.ndarray | None = None  # [N, C] float32, the model's per-channel error

    @property
    def ts(self) -> np.ndarray:
        """Data time of each window's newest sample."""
        assert self.active is not None
        return self.start_time + self.window - 1 + np.arange(len(self.active), dtype=np.float64)


@dataclass(frozen=True)
class Episode:
    """One alarm of one stream, from the first window in alarm to the last."""

    event_id: str
    stream: str
    start: int  # window index
    stop: int  # one past the last window in alarm
    peak: int  # window with the highest detector score
    kind: str | None  # the fault it overlaps most (None: a false alarm)
    fault: int  # index of that fault in its stream (-1: none)
    start_ts: float


def signatures(seed: int) -> dict[str, list[int]]:
    """The channels each fault kind hits, one or two per kind, fixed by `seed`."""
    rng = np.random.default_rng([seed, 0x5167])
    return {
        kind: sorted(int(c) for c in rng.choice(len(CHANNELS), rng.integers(1, 3), replace=False))
        for kind in FAULT_KINDS
    }


def simulate_stream(
    name: str,
    seed: int,
    rows: int,
    every_s: float,
    start_time: float = DEFAULT_START_TIME,
    channels: dict[str, list[int]] | None = None,
) -> Stream:
    """`rows` seconds of one pump (machine build 0, run `seed`) with a fault every `every_s`
    (kinds in a shuffled cycle, 120-300 s long, at a random point of each slot)."""
    values = MachineSimulator(seed, 1.0, start_time).step(rows)
    rng = np.random.default_rng([seed, 0xFA17])
    scales = reference_scales(0, 1.0)
    kinds = [str(k) for k in rng.permutation(FAULT_KINDS)]
    faults: list[Fault] = []
    slot = WARM_UP_S
    while slot + every_s <= rows:
        kind = kinds[len(faults) % len(kinds)]
        length = int(rng.integers(120, 301))
        start = slot + int(rng.integers(0, max(1, int(every_s) - length - 300)))
        hit = None if channels is None else channels[kind]
        values, _ = inject(values, kind, start, length, rng, channels=hit, scales=scales)
        faults.append(Fault(kind, start, start + length))
        slot += int(every_s)
    return Stream(name, start_time, values, faults)


def encode(model: Model, stream: Stream) -> None:
    """Score every window of the stream (hop 1) and replay the model's detector over it."""
    manifest = model.manifest
    if manifest.alarm.hop != 1:
        raise ValueError(f"{model.path}: the benchmark scores every window; the model's hop is "
                         f"{manifest.alarm.hop}, retrain with --hop 1")  # fmt: skip
    columns = [CHANNELS.index(c) for c in manifest.channels]
    values = stream.values[:, columns].astype(np.float32)
    view = np.lib.stride_tricks.sliding_window_view(values, model.window, axis=0)
    view = view.transpose(0, 2, 1)  # [N, window, C]
    newest_needed = (manifest.detection is not None) and manifest.detection.sample == "newest"
    scale = np.asarray(manifest.channel_scale, dtype=np.float64)
    scores, channel_scores, codes, newest, residuals = [], [], [], [], []
    for i in range(0, len(view), BATCH):
        x = np.ascontiguousarray(view[i : i + BATCH])
        out = model.run(x)
        scores.append(out.score.astype(np.float64))
        channel_scores.append(out.channel_score.astype(np.float64))
        codes.append(out.code.astype(np.float32))
        residuals.append(((x - out.reconstruction).mean(axis=1) / scale).astype(np.float32))
        if newest_needed:
            newest.append(((x[:, -1] - out.reconstruction[:, -1]) / scale) ** 2)
    found = replay(
        Stages.of(manifest),
        manifest.alarm,
        np.concatenate(scores),
        np.concatenate(channel_scores),
        newest=np.concatenate(newest) if newest_needed else None,
    )
    stream.window = model.window
    stream.score, stream.active, stream.code = found.score, found.active, np.concatenate(codes)
    stream.residual = np.concatenate(residuals)
    stream.channel_score = np.concatenate(channel_scores).astype(np.float32)


def episodes(stream: Stream) -> list[Episode]:
    """The stream's alarm episodes, each matched to the fault whose rows its windows cover most."""
    assert stream.active is not None and stream.score is not None
    edges = np.diff(np.r_[0, stream.active.astype(np.int8), 0])
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    found = []
    for n, (a, b) in enumerate(zip(starts, stops, strict=True)):
        # Rows seen by the episode's windows: from the first window's oldest to the last's newest.
        low, high = a, b - 1 + stream.window
        overlap = [max(0, min(high, f.stop) - max(low, f.start)) for f in stream.faults]
        best = int(np.argmax(overlap)) if overlap and max(overlap) > 0 else -1
        found.append(
            Episode(
                event_id=f"{stream.name}#{n}",
                stream=stream.name,
                start=int(a),
                stop=int(b),
                peak=int(a + np.argmax(stream.score[a:b])),
                kind=stream.faults[best].kind if best >= 0 else None,
                fault=best,
                start_ts=float(stream.ts[a]),
            )
        )
    return found


def event_ids(stream: Stream, found: list[Episode]) -> list[str | None]:
    """Per window: the event id of the episode it is in (None outside alarms)."""
    assert stream.active is not None
    ids: list[str | None] = [None] * len(stream.active)
    for e in found:
        ids[e.start : e.stop] = [e.event_id] * (e.stop - e.start)
    return ids
