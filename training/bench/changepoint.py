"""SKAB scoring: pooled pointwise F1 / FAR / MAR and SKAB's NAB-variant changepoint score.

Written from the formulas in ../shared/datasets/README.md and the semantics of SKAB's reference
scorer (`chp_score(..., metric="nab", window_width="60s", anomaly_window_destination="righter")`,
read, not copied); re-scoring the published Conv-AE predictions for valve1 reproduces F1 0.75,
FAR 14.40 %, MAR 31.84 %, changepoint standard 20.90 exactly:

- Scored rows are the test rows only (row 400 on): the published files cover exactly those rows.
- Predicted changepoints are BOTH edges of the binary prediction, each placed at the first row of
  the new state; a prediction that is already 1 on the first scored row is an edge there (the
  reference takes |diff| with the first value set to the prediction itself). Rising edges alone
  would score 10.99.
- True changepoints are the scored rows with `changepoint` == 1. Each opens a window
  [t_cp, t_cp + 60 s] in time, both ends included (right end excluded: 20.79), so a 2 s step in
  the data gives a window fewer rows.
- Windows never overlap: when a window reaches the next changepoint, the next window starts where
  this one ends (the reference's default "cut right window"). Two changepoints 1 s apart thus get
  [t1, t1 + 60] and [t1 + 60, t2 + 60]: a detection at t1 + 5 s hits the first window only and
  the second is missed. (Letting both windows keep their full 60 s counted that missed window as
  hit: 29.9 instead of the reference's 26.28 on Conv-AE outside valve1.) A detection exactly on a
  shared boundary lies in both windows, as in the reference.
- Each window scores its own first detection; later ones in it count for nothing. A detection
  costs A_fp only when it lies in no window at all.
- The first detection's place in its window is the elapsed fraction of the window's time span,
  at the reference's resolution of 1,000 steps: x = linspace(-pi/2, pi/2, 1000)[floor(1000 f)]
  (the last step for f = 1).
- S_null = A_fn per window (no detections), S_perfect = A_tp per window (a detection at each
  window's start); S, S_null and S_perfect are summed over all files before normalising.
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


# The reference evaluates its tanh curve at this many evenly spaced points.
RESOLUTION = 1000
# Timestamps are float unix seconds: this absorbs their rounding at window edges.
TIME_TOLERANCE_S = 1e-6


def edges(prediction: np.ndarray) -> np.ndarray:
    """Rows where the prediction changes (0->1 or 1->0), and row 0 if it starts at 1."""
    p = np.asarray(prediction).astype(np.int8)
    return np.flatnonzero(np.diff(np.r_[np.int8(0), p]) != 0)


def window_weight(fraction: float, profile: Profile) -> float:
    """Score of a first detection after `fraction` (0..1) of its window's time span."""
    step = min(math.floor(RESOLUTION * fraction + 1e-9), RESOLUTION - 1)
    x = -math.pi / 2 + math.pi * step / (RESOLUTION - 1)
    half = (profile.a_tp - profile.a_fp) / 2
    return half * (-math.tanh(x) / math.tanh(math.pi / 2)) + half + profile.a_fp


def scoring_windows(
    timestamps: np.ndarray, changepoint: np.ndarray, window_s: float = WINDOW_S
) -> list[tuple[float, float]]:
    """[start, end] seconds right of each true changepoint; a window reaching the next one's
    changepoint makes that one start where it ends (windows never overlap)."""
    t = np.asarray(timestamps, dtype=np.float64)
    out: list[tuple[float, float]] = []
    for cp in t[np.asarray(changepoint) == 1].tolist():
        start = max(cp, out[-1][1]) if out else cp
        out.append((start, cp + window_s))
    return out


@dataclass(frozen=True)
class Detections:
    """One file's changepoint outcome: per window the elapsed fraction at its first hit, or None."""

    hits: list[float | None]
    outside: int  # predicted changepoints in no window

    def score(self, profile: Profile) -> float:
        """Raw (unnormalised) score of this file under `profile`."""
        total = profile.a_fp * self.outside
        for hit in self.hits:
            total += profile.a_fn if hit is None else window_weight(hit, profile)
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
    found = t[edges(prediction)]
    in_any = np.zeros(len(found), dtype=bool)
    hits: list[float | None] = []
    eps = TIME_TOLERANCE_S
    for start, end in scoring_windows(t, changepoint, window_s):
        inside = (found >= start - eps) & (found <= end + eps)
        in_any |= inside
        if inside.any():
            span = end - start
            hits.append(min(max((found[inside][0] - start) / span, 0.0), 1.0) if span > 0 else 0.0)
        else:
            hits.append(None)
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
