"""Score a labelled table with a model file and the daemon's alarm logic; compute metrics.

Decisions are causal: the alarm state after the window ending at row t holds for rows t .. until
the next scored window; rows before a segment's first full window count as normal. Metrics follow
../shared/datasets/README.md: F1 = TP / (TP + (FP + FN) / 2), FAR = 100 FP / (FP + TN),
MAR = 100 FN / (FN + TP), plus event-level precision / recall (an event = a run of alarms).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.alarm import replay
from daemon.manifest import AlarmPolicy
from daemon.model import Model
from training.data import SensorTable, windows


@dataclass
class Evaluation:
    score: np.ndarray  # [T] score of the window ending at or last before each row (NaN: none)
    alarm: np.ndarray  # [T] bool, causal alarm decision per row
    label: np.ndarray  # [T] bool
    metrics: dict[str, float | None] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        return (
            f"F1 {m['f1']:.3f}  FAR {m['far']:.2f} %  MAR {m['mar']:.2f} %  |  events: "
            f"precision {m['event_precision']:.2f}  recall {m['event_recall']:.2f}  "
            f"({m['detected_events']:.0f}/{m['true_events']:.0f} detected, "
            f"{m['false_events']:.0f} false, {m['false_events_per_day']:.2f}/day)  "
            + (f"mean delay {m['mean_delay_s']:.1f} s" if m["mean_delay_s"] is not None else "")
        )


def causal_decisions(
    model: Model, table: SensorTable, policy: AlarmPolicy, sensitivity: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (score, alarm) from hop-spaced windows per segment, alarm state reset per segment."""
    n = len(table.timestamps)
    score = np.full(n, np.nan)
    alarm = np.zeros(n, dtype=bool)
    for seg in table.segments:
        x, ends = windows(table, model.window, policy.hop, segments=[seg])
        if not len(x):
            continue
        s = np.concatenate([model.run(x[i : i + 1024]).score for i in range(0, len(x), 1024)])
        active = replay(s, policy, sensitivity)
        # Hold each decision until the next window (or the segment's end).
        stops = np.append(ends[1:], seg[1])
        reps = stops - ends
        rows = np.repeat(ends, reps) + _ramp(reps)
        score[rows] = np.repeat(s, reps)
        alarm[rows] = np.repeat(active, reps)
    return score, alarm


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
    alarm: np.ndarray, label: np.ndarray, period_s: float, tolerance_rows: int = 0
) -> dict[str, float | None]:
    """Pointwise F1/FAR/MAR (percent) and event-level precision/recall/delay.

    At event level an alarm run matches a labelled run it overlaps or that ended fewer than
    `tolerance_rows` before it starts: a window still contains an anomaly for up to one window
    length after it (a 1-row spike is seen by the next `window` windows). Pointwise numbers stay
    strict.
    """
    tp = int(np.sum(alarm & label))
    fp = int(np.sum(alarm & ~label))
    fn = int(np.sum(~alarm & label))
    tn = int(np.sum(~alarm & ~label))
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
    }
    return result


def evaluate_table(
    model: Model, table: SensorTable, policy: AlarmPolicy, label_column: str = "anomaly"
) -> Evaluation:
    if label_column not in table.labels:
        raise ValueError(f"no label column {label_column!r} (found {sorted(table.labels)})")
    label = table.labels[label_column].astype(bool)
    score, alarm = causal_decisions(model, table, policy)
    return Evaluation(score, alarm, label, metrics(alarm, label, table.period_s, model.window))


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
