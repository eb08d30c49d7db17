"""Score a labelled table with a model file and the daemon's alarm logic; compute metrics.

Decisions are causal: the alarm state after the window ending at row t holds for rows t .. until
the next scored window; rows before a segment's first full window count as normal. Metrics follow
../shared/datasets/README.md: F1 = TP / (TP + (FP + FN) / 2), FAR = 100 FP / (FP + TN),
MAR = 100 FN / (FN + TP), plus event-level precision / recall (an event = a run of alarms).
Grid rows that no reading fell into (`SensorTable.filled`) have no observed label: they are left
out of the pointwise counts, and labelled runs are joined across them (training/data.py).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from daemon.detector import Stages, replay
from daemon.manifest import AlarmPolicy
from daemon.model import Model
from training.data import SensorTable, windows

# In alarm for at least this share of rows, a model says more about itself than about the data.
ALARM_SHARE_WARNING = 0.5


class WindowScores(Protocol):
    """What a scorer returns for a batch of windows: one score each, and one per channel."""

    score: np.ndarray  # [B]
    channel_score: np.ndarray  # [B, C]


class WindowModel(Protocol):
    """What causal decisions need of a model: its window length and a batch scorer. The daemon's
    Model is one; the benchmarks' baselines (training/bench/baseline.py) are others."""

    @property
    def window(self) -> int: ...

    def run(self, windows: np.ndarray) -> WindowScores: ...


@dataclass
class Evaluation:
    score: np.ndarray  # [T] score of the window ending at or last before each row (NaN: none)
    alarm: np.ndarray  # [T] bool, causal alarm decision per row
    label: np.ndarray  # [T] bool
    metrics: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        share = m.get("alarm_share")
        warning = ""
        if share is not None and share >= ALARM_SHARE_WARNING:
            warning = (
                f"WARNING: in alarm {100 * share:.0f} % of rows: the model does not fit this data "
                "(another operating point, or too little training data?), so the numbers below "
                "say little about detection\n"
            )
        return warning + (
            f"F1 {m['f1']:.3f}  FAR {m['far']:.2f} %  MAR {m['mar']:.2f} %  |  events: "
            f"precision {m['event_precision']:.2f}  recall {m['event_recall']:.2f}  "
            f"({m['detected_events']:.0f}/{m['true_events']:.0f} detected, "
            f"{m['false_events']:.0f} false, {m['false_events_per_day']:.2f}/day)  "
            + (f"mean delay {m['mean_delay_s']:.1f} s" if m["mean_delay_s"] is not None else "")
        )


@dataclass
class WindowOutputs:
    """A scorer's outputs for the hop-spaced windows of one table, segment after segment."""

    rows: int  # rows of the table
    ends: np.ndarray  # [N] row of each window's last sample
    stops: np.ndarray  # [N] the row where the window's decision stops holding (next window)
    first: np.ndarray  # [N] bool: the window opens a segment (a gap lies before it)
    score: np.ndarray  # [N]
    channel_score: np.ndarray  # [N, C]
    # [N, C] squared standardised error of each window's newest sample (NaN: not available)
    newest: np.ndarray | None = None


@dataclass
class RowDecisions:
    """Per row: the window ending at or last before it (its score, channel scores, detection
    score and threshold) and the alarm state; NaN and no alarm before a segment's first window."""

    score: np.ndarray  # [T] the model's window score
    channel_score: np.ndarray  # [T, C]
    detection: np.ndarray  # [T] the detector's smoothed, combined score
    threshold: np.ndarray  # [T] the enter threshold in force
    alarm: np.ndarray  # [T] bool
    new_normal: np.ndarray  # [T] bool, True on the row where an alarm ended as a new normal


def window_outputs(model: WindowModel, table: SensorTable, hop: int) -> WindowOutputs:
    """Score every hop-spaced window of every segment (the costly part of a decision)."""
    ends, stops, first, scores, channels, newest = [], [], [], [], [], []
    for seg in table.segments:
        x, seg_ends = windows(table, model.window, hop, segments=[seg])
        if not len(x):
            continue
        starts = range(0, len(x), 1024)
        batches = [model.run(x[i : i + 1024]) for i in starts]
        scores.append(np.concatenate([b.score for b in batches]).astype(np.float64))
        channels.append(np.concatenate([b.channel_score for b in batches]).astype(np.float64))
        parts = [_newest(model, x[i : i + 1024], b) for i, b in zip(starts, batches, strict=True)]
        newest.append(np.concatenate(parts))
        ends.append(seg_ends)
        # Each decision holds until the next window (or the segment's end).
        stops.append(np.append(seg_ends[1:], seg[1]))
        first.append(np.arange(len(seg_ends)) == 0)
    c = table.values.shape[1]
    join = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
    return WindowOutputs(
        len(table.timestamps),
        join(ends, np.empty(0, np.int64)),
        join(stops, np.empty(0, np.int64)),
        join(first, np.empty(0, bool)),
        join(scores, np.empty(0)),
        join(channels, np.empty((0, c))),
        join(newest, np.empty((0, c))),
    )


def _newest(model: WindowModel, x: np.ndarray, out: WindowScores) -> np.ndarray:
    """Squared standardised error of the windows' newest sample [B, C] (NaN if unknown)."""
    recon = getattr(out, "reconstruction", None)
    manifest = getattr(model, "manifest", None)
    if recon is not None and manifest is not None:
        scale = np.asarray(manifest.channel_scale, dtype=np.float64)
        return ((x[:, -1].astype(np.float64) - recon[:, -1]) / scale) ** 2
    given = getattr(out, "newest", None)
    if given is not None:
        return np.asarray(given, dtype=np.float64)
    return np.full((len(x), x.shape[-1]), np.nan)


def decide(
    out: WindowOutputs, stages: Stages, policy: AlarmPolicy, sensitivity: float = 1.0
) -> RowDecisions:
    """Replay one detector over the windows (reset at each gap) and hold decisions per row."""
    n, c = out.rows, out.channel_score.shape[1]
    # A NaN row before every segment but the first: the detector's gap reset.
    gaps = np.flatnonzero(out.first)[1:]
    score = np.insert(out.score, gaps, np.nan)
    channel = np.insert(out.channel_score, gaps, np.nan, axis=0)
    newest = None if out.newest is None else np.insert(out.newest, gaps, np.nan, axis=0)
    found = replay(stages, policy, score, channel, sensitivity, newest)
    keep = ~np.isnan(score)
    reps = out.stops - out.ends
    rows = np.repeat(out.ends, reps) + _ramp(reps)
    result = RowDecisions(
        np.full(n, np.nan),
        np.full((n, c), np.nan),
        np.full(n, np.nan),
        np.full(n, np.nan),
        np.zeros(n, dtype=bool),
        np.zeros(n, dtype=bool),
    )
    result.score[rows] = np.repeat(out.score, reps)
    result.channel_score[rows] = np.repeat(out.channel_score, reps, axis=0)
    result.detection[rows] = np.repeat(found.score[keep], reps)
    result.threshold[rows] = np.repeat(found.threshold[keep], reps)
    result.alarm[rows] = np.repeat(found.active[keep], reps)
    result.new_normal[out.ends] = found.new_normal[keep]
    return result


def decide_rows(
    model: Model,
    table: SensorTable,
    policy: AlarmPolicy | None = None,
    sensitivity: float = 1.0,
    stages: Stages | None = None,
) -> RowDecisions:
    """A model file's causal decisions on every row (its own policy and stages unless given)."""
    policy = policy or model.manifest.alarm
    out = window_outputs(model, table, policy.hop)
    return decide(out, stages or Stages.of(model.manifest), policy, sensitivity)


def causal_decisions(
    model: Model,
    table: SensorTable,
    policy: AlarmPolicy | None = None,
    sensitivity: float = 1.0,
    stages: Stages | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (detection score, alarm): `decide_rows` without the rest."""
    rows = decide_rows(model, table, policy, sensitivity, stages)
    return rows.detection, rows.alarm


def _ramp(reps: np.ndarray) -> np.ndarray:
    """[0, 1, .., r0-1, 0, 1, .., r1-1, ...] for run lengths `reps`."""
    starts = np.repeat(np.cumsum(reps) - reps, reps)
    return np.arange(int(reps.sum())) - starts


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def metrics(
    alarm: np.ndarray,
    label: np.ndarray,
    period_s: float,
    tolerance_rows: int = 0,
    filled: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Pointwise F1/FAR/MAR (percent) and event-level precision/recall/delay.

    At event level an alarm run matches a labelled run it overlaps or that ended fewer than
    `tolerance_rows` before it starts: a window still contains an anomaly for up to one window
    length after it (a 1-row spike is seen by the next `window` windows). Pointwise numbers stay
    strict, and leave out `filled` rows (no reading, so no observed label).
    """
    seen = np.ones(len(alarm), dtype=bool) if filled is None else ~np.asarray(filled, bool)
    tp = int(np.sum(alarm & label & seen))
    fp = int(np.sum(alarm & ~label & seen))
    fn = int(np.sum(~alarm & label & seen))
    tn = int(np.sum(~alarm & ~label & seen))
    true_events, predicted = runs(label), runs(alarm)
    t = tolerance_rows
    hit_true = [any(a < e + t and s < b for a, b in predicted) for s, e in true_events]
    good_pred = [any(a < e + t and s < b for s, e in true_events) for a, b in predicted]
    delays = []
    for (s, e), hit in zip(true_events, hit_true, strict=True):
        if hit:
            first = np.flatnonzero(alarm[s : e + t])
            delays.append(first[0] * period_s if len(first) else 0.0)
    false_events = len(predicted) - sum(good_pred)
    days = len(alarm) * period_s / 86400
    result: dict[str, float | None] = {
        "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
        "far": 100 * fp / (fp + tn) if fp + tn else 0.0,
        "mar": 100 * fn / (fn + tp) if fn + tp else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "true_events": len(true_events),
        "detected_events": sum(hit_true),
        "predicted_events": len(predicted),
        "false_events": false_events,
        "false_events_per_day": false_events / days if days else 0.0,
        "event_precision": sum(good_pred) / len(predicted) if predicted else 1.0,
        "event_recall": sum(hit_true) / len(true_events) if true_events else 1.0,
        "mean_delay_s": float(np.mean(delays)) if delays else None,
        "alarm_share": (tp + fp) / (tp + fp + fn + tn) if tp + fp + fn + tn else 0.0,
        "filled_rows": int((~seen).sum()),
    }
    return result


def evaluate_table(
    model: Model,
    table: SensorTable,
    policy: AlarmPolicy,
    label_column: str = "anomaly",
    stages: Stages | None = None,
) -> Evaluation:
    if label_column not in table.labels:
        raise ValueError(f"no label column {label_column!r} (found {sorted(table.labels)})")
    label = table.labels[label_column].astype(bool)
    score, alarm = causal_decisions(model, table, policy, stages=stages)
    found = metrics(alarm, label, table.period_s, model.window, table.filled)
    return Evaluation(score, alarm, label, found)


def write_outputs(
    result: Evaluation, table: SensorTable, out_dir: Path, policy: AlarmPolicy
) -> None:
    """decisions.csv (timestamp, score, alarm) and score.png (score vs time with labels)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "decisions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "score", "alarm"])
        for ts, s, a in zip(
            table.timestamps.tolist(), result.score.tolist(), result.alarm.tolist(), strict=True
        ):
            w.writerow([f"{ts:.3f}", "" if s != s else f"{s:.6g}", int(a)])
    from training.report import plot_scores

    plot_scores(
        out_dir / "score.png", table.timestamps, result.score, result.alarm, result.label, policy
    )
