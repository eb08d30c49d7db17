"""Window scorers for the detection benchmarks, behind one small protocol.

A scorer is fitted on one file's training rows and turns windows [B, window, C] (raw units) into
a score per window and per channel; it also returns the scores of normal windows it never saw
while fitting (held-back or cross-fitted), which calibrate its thresholds. Everything after the
window score (calibration, smoothing, thresholds, alarm policy, decisions) is one shared function,
`training.bench.detection.detect`, the same for every scorer.

`Autoencoder` is the product: `training.pipeline.train`, the exported ONNX file, the daemon's
loader. The baselines (training/bench/baseline.py) split their training rows exactly as the
trainer does (`calibration_plan`), so all scorers are calibrated on the same kind of evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from daemon.manifest import AlarmPolicy, Detection
from training.calibrate import Series
from training.data import SensorTable, normal_segments, split_heldback, windows
from training.evaluate import WindowModel

if TYPE_CHECKING:
    from training.config import TrainOptions

log = logging.getLogger(__name__)

Segments = list[tuple[int, int]]


@dataclass
class Fitted:
    """A scorer fitted on one file's training rows, with the evidence to calibrate it."""

    model: WindowModel
    # Scores of normal windows the model (or its fold model) never fitted, hop-spaced, one array
    # per contiguous series: the alarm replay of the calibration must not run across a gap.
    calibration: list[Series]
    cross_fitted: bool
    period_s: float
    # The product's own policy and stages from its manifest: the shared calibration must
    # reproduce them.
    manifest_policy: AlarmPolicy | None = None
    manifest_detection: Detection | None = None
    notes: list[str] = field(default_factory=list)
    targets: tuple[int, ...] | None = None  # the scored channels (None: all)


class WindowScorer(Protocol):
    """Fits on a table of normal training rows; `name` labels its row in the tables."""

    name: str

    def fit(self, table: SensorTable, opts: TrainOptions, workdir: Path) -> Fitted: ...


@dataclass(frozen=True)
class CalibrationPlan:
    """The trainer's split of the training rows (training/pipeline.py, `train`)."""

    final: Segments  # rows the shipped model is fitted on
    # (fit rows, held rows) per calibration model. Held-back mode: one pair, and the shipped
    # model is that model. Cross-fitted: one pair per fold that has data on both sides.
    folds: list[tuple[Segments, Segments]]
    cross_fitted: bool


def count_windows(segments: Segments, window: int, hop: int) -> list[int]:
    """Windows per segment (hop-spaced), as `training.data.windows` cuts them."""
    return [(e - s - window) // hop + 1 if e - s >= window else 0 for s, e in segments]


def calibration_plan(table: SensorTable, opts: TrainOptions) -> CalibrationPlan:
    """Where the trainer fits and where it takes calibration scores, for these options."""
    from training.pipeline import CROSS_FOLDS, MIN_HELDBACK_WINDOWS

    window, hop = opts.model.window, opts.hop
    normal = normal_segments(table)
    train_segs, held_segs = split_heldback(table, opts.heldback_fraction)
    train_segs, held_segs = normal_segments(table, train_segs), normal_segments(table, held_segs)
    n_held = sum(count_windows(held_segs, window, hop))
    cross = opts.cross_fit if opts.cross_fit is not None else n_held < MIN_HELDBACK_WINDOWS
    if not cross:
        if n_held == 0:
            raise ValueError("the held-back data hold no complete window; record more data")
        return CalibrationPlan(train_segs, [(train_segs, held_segs)], False)
    rows = np.concatenate([np.arange(a, b) for a, b in normal]) if normal else np.empty(0, int)
    bounds = np.linspace(0, len(rows), CROSS_FOLDS + 1).astype(int)
    folds = []
    for k in range(CROSS_FOLDS):
        if bounds[k + 1] <= bounds[k]:
            continue
        lo, hi = int(rows[bounds[k]]), int(rows[bounds[k + 1] - 1]) + 1
        held = [(max(a, lo), min(b, hi)) for a, b in normal if min(b, hi) > max(a, lo)]
        rest = [(a, min(b, lo)) for a, b in normal if min(b, lo) > a]
        rest += [(max(a, hi), b) for a, b in normal if b > max(a, hi)]
        if sum(count_windows(rest, window, 1)) >= 2 and sum(count_windows(held, window, hop)):
            folds.append((rest, held))
    if not folds:
        raise ValueError("too little normal data to cross-fit thresholds; record more rows")
    return CalibrationPlan(normal, folds, True)


def held_series(table: SensorTable, segments: Segments, window: int, hop: int) -> list[np.ndarray]:
    """Hop-spaced windows per segment that holds at least one."""
    out = []
    for seg in segments:
        x, _ = windows(table, window, hop, segments=[seg])
        if len(x):
            out.append(x)
    return out


class Autoencoder:
    """The product: `oteo train` on the training rows, scored by the exported ONNX file."""

    name = "oteo"

    def fit(self, table: SensorTable, opts: TrainOptions, workdir: Path) -> Fitted:
        from daemon.model import Model
        from training.pipeline import train

        result = train(table, opts, workdir / f"{_file_stem(opts.name)}.onnx")
        model = Model.load(result.path)
        plan = calibration_plan(table, opts)
        # The trainer returns its calibration scores concatenated, series after series.
        lengths = [
            n
            for _, held in plan.folds
            for n in count_windows(held, opts.model.window, opts.hop)
            if n
        ]
        scores = result.heldback_scores
        if sum(lengths) != len(scores):
            raise RuntimeError(
                f"{len(scores)} calibration scores from the trainer, {sum(lengths)} expected: "
                "training/bench/scorer.py no longer splits the rows as training/pipeline.py does"
            )
        cuts = np.cumsum(lengths)[:-1]
        parts = zip(
            np.split(scores.astype(np.float64), cuts),
            np.split(result.heldback_channel_scores.astype(np.float64), cuts),
            np.split(result.heldback_newest, cuts),
            strict=True,
        )
        series = [Series(s, c, n) for s, c, n in parts]
        m = result.manifest
        notes = result.notes + m.calibration.warnings
        targets = tuple(m.target_indices()) if m.roles else None
        return Fitted(
            model, series, plan.cross_fitted, table.period_s, m.alarm, m.detection, notes, targets
        )


def scorer_failures() -> tuple[type[Exception], ...]:
    """Errors meaning "this scorer cannot learn from these data": the file counts as failed."""
    from training.export import ExportError

    return (ValueError, ArithmeticError, ExportError)  # a DataError is a ValueError


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
