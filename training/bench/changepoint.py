"""SKAB scoring: pooled pointwise F1 / FAR / MAR and SKAB's NAB-variant changepoint score.

Written from the formulas in ../shared/datasets/README.md. The details the README leaves open were
settled by re-scoring the published Conv-AE predictions for valve1, which this module reproduces
exactly (F1 0.75, FAR 14.40 %, MAR 31.84 %, changepoint standard 20.90):

- Scored rows are the test rows only (row 400 on): the published files cover exactly those rows.
- Predicted changepoints are BOTH edges of the binary prediction, each placed at the first row of
  the new state; a prediction that is already 1 on the first scored row is not an edge. Rising
  edges alone score 10.99.
- True changepoints are the scored rows with `changepoint` == 1. A window holds every scored row
  whose timestamp lies in [t_cp, t_cp + 60 s], right end INCLUDED (excluded: 20.79). Windows are
  cut by time, so a 2 s step in the data gives a window fewer rows.
- x of a detection is its row position in the window on an even grid over [-pi/2, pi/2]
  (first row -pi/2, last row +pi/2): `linspace(-pi/2, pi/2, rows in window)[position]`.
  (x from seconds since t_cp would give 20.904, which rounds the same.)
- Each window scores its own first detection; later ones in it count for nothing. Windows that
  touch (SKAB puts a changepoint at the end of its neighbour's 60 s) may share a detection; a
  detection costs A_fp only when it lies in no window at all.
- S_null = A_fn per window (no detections), S_perfect = A_tp per window (a detection on each
  window's first row); S, S_null and S_perfect are summed over all files before normalising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINDOW_S = 60.0


@dataclass(frozen=True)
class Profile:
    """Weights of a true detection (early in a window), a false one and a missed window."""

    a_tp: float
    a_fp: float
    a_fn: float


PROFILES = {
    "standard": Profile(1.0, -0.11, -1.0),
    "low_fp": Profile(1.0, -0.22, -1.0),
    "low_fn": Profile(1.0, -0.11, -2.0),
}


def edges(prediction: np.ndarray) -> np.ndarray:
    """Rows where the binary prediction changes (0->1 or 1->0): the first row of the new state."""
    p = np.asarray(prediction).astype(np.int8)
    return np.flatnonzero(np.diff(p) != 0) + 1


def window_weight(position: int, rows: int, profile: Profile) -> float:
    """Score of a first detection at `position` (0-based) among `rows` rows of a window."""
    x = -math.pi / 2 if rows < 2 else -math.pi / 2 + math.pi * position / (rows - 1)
    half = (profile.a_tp - profile.a_fp) / 2
    return half * (-math.tanh(x) / math.tanh(math.pi / 2)) + half + profile.a_fp


@dataclass(frozen=True)
class Detections:
    """One file's changepoint outcome: per window (position, rows) of its first hit or None."""

    hits: list[tuple[int, int] | None]
    outside: int  # predicted changepoints in no window

    def score(self, profile: Profile) -> float:
        """Raw (unnormalised) score of this file under `profile`."""
        total = profile.a_fp * self.outside
        for hit in self.hits:
            total += profile.a_fn if hit is None else window_weight(*hit, profile)
        return total


def detections(
    timestamps: np.ndarray,
    changepoint: np.ndarray,
    prediction: np.ndarray,
    window_s: float = WINDOW_S,
) -> Detections:
    """Match predicted edges to the windows right of each true changepoint (scored rows only)."""
    t = np.asarray(timestamps, dtype=np.float64)
    if not len(t) == len(changepoint) == len(prediction):
        raise ValueError("timestamps, changepoint and prediction must have the same length")
    found = edges(prediction)
    in_any = np.zeros(len(found), dtype=bool)
    hits: list[tuple[int, int] | None] = []
    for start in np.flatnonzero(np.asarray(changepoint) == 1).tolist():
        # Rows in [t_cp, t_cp + window_s]; a tiny tolerance absorbs float rounding of timestamps.
        stop = int(np.searchsorted(t, t[start] + window_s + 1e-6, side="right"))
        inside = (found >= start) & (found < stop)
        in_any |= inside
        hits.append((int(found[inside][0]) - start, stop - start) if inside.any() else None)
    return Detections(hits, int((~in_any).sum()))


def normalised(files: Sequence[Detections], profile: Profile) -> float:
    """100 (S - S_null) / (S_perfect - S_null), each summed over all files."""
    windows = sum(len(d.hits) for d in files)
    if windows == 0:
        return 0.0
    score = sum(d.score(profile) for d in files)
    null, perfect = profile.a_fn * windows, profile.a_tp * windows
    return 100 * (score - null) / (perfect - null)


@dataclass(frozen=True)
class FileScore:
    """Everything one file adds to the pooled SKAB numbers."""

    tp: int
    fp: int
    fn: int
    tn: int
    changepoints: Detections


def score_file(
    timestamps: np.ndarray, anomaly: np.ndarray, changepoint: np.ndarray, prediction: np.ndarray
) -> FileScore:
    """Confusion counts on `anomaly` and changepoint detections, for the scored rows given."""
    y = np.asarray(anomaly).astype(bool)
    p = np.asarray(prediction).astype(bool)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    return FileScore(
        tp=int(np.sum(y & p)),
        fp=int(np.sum(~y & p)),
        fn=int(np.sum(y & ~p)),
        tn=int(np.sum(~y & ~p)),
        changepoints=detections(timestamps, changepoint, p),
    )


def pooled(files: Sequence[FileScore]) -> dict[str, float | int]:
    """The SKAB table for many files: counts pooled over all of their scored rows."""
    tp, fp = sum(f.tp for f in files), sum(f.fp for f in files)
    fn, tn = sum(f.fn for f in files), sum(f.tn for f in files)
    cps = [f.changepoints for f in files]
    return {
        "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
        "far": 100 * fp / (fp + tn) if fp + tn else 0.0,
        "mar": 100 * fn / (fn + tp) if fn + tp else 0.0,
        "changepoint_standard": normalised(cps, PROFILES["standard"]),
        "changepoint_low_fp": normalised(cps, PROFILES["low_fp"]),
        "changepoint_low_fn": normalised(cps, PROFILES["low_fn"]),
        "changepoints": sum(len(d.hits) for d in cps),
        "missed_changepoints": sum(h is None for d in cps for h in d.hits),
        "false_changepoints": sum(d.outside for d in cps),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
