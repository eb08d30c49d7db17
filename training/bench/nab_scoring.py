"""NAB v1.1 scoring, written from the paper (Lavin & Ahmad 2015, arXiv:1510.03336).

A detection is a scored row whose anomaly likelihood is at or above the threshold. Per file:
- the probationary period (first 15 % of rows, at most 750) is learned from and never scored;
- in each anomaly window only the first detection counts: A_TP * sigma(y) / sigma(-1), with
  sigma(y) = 2 / (1 + e^(5y)) - 1 (the paper's sigma^A with unit weights) and
  y = -(last - i + 1) / width, so the window's first row earns exactly A_TP and later ones less;
- a detection outside every window is a false positive worth -A_FP, or, after a window,
  A_FP * sigma(y) with y = (i - last) / (width - 1) (cheap right after the window, -A_FP far
  away; -A_FP flat beyond y = 3); the +1 / -1 in the two positions are NAB's own conventions,
  kept so that our numbers compare with final_results.json;
- each window without a detection costs -A_FN.
Raw scores are summed over the corpus and normalised 100 (S - S_null) / (S_perfect - S_null),
with the null detector (no detections: -A_FN per window) and the perfect one (each window's first
row: A_TP per window). The scoreboard picks, per profile, the threshold that maximises the corpus
score; `sweep` finds that maximum exactly over every distinct likelihood.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750  # 15 % of 5000 rows
# Short names (our JSON keys) -> NAB's profile names in config/profiles.json.
PROFILE_NAMES = {
    "standard": "standard",
    "low_fp": "reward_low_FP_rate",
    "low_fn": "reward_low_FN_rate",
}


@dataclass(frozen=True)
class Profile:
    """Weights of one application profile, as positive magnitudes (NAB's profiles.json)."""

    tp: float
    fp: float
    fn: float


# NAB v1.1's config/profiles.json, for callers without the dataset folder.
PROFILES = {
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "low_fp": Profile(tp=1.0, fp=0.22, fn=1.0),
    "low_fn": Profile(tp=1.0, fp=0.11, fn=2.0),
}


@dataclass(frozen=True)
class LabelledFile:
    """One data file as the scorer sees it: its row count and anomaly windows."""

    name: str
    rows: int
    windows: tuple[tuple[int, int], ...]  # first and last row (inclusive) of each window

    @property
    def probation(self) -> int:
        """Rows at the start that are learned from and not scored."""
        return probation_rows(self.rows)


@dataclass(frozen=True)
class Outcome:
    """A corpus (or file) scored at one threshold."""

    threshold: float
    raw: float
    normalised: float | None  # None without windows: the null and perfect scores coincide
    detected_windows: int
    missed_windows: int
    false_positives: int  # rows


def probation_rows(rows: int) -> int:
    """NAB's probationary period: the first 15 % of rows, at most 750."""
    return min(math.floor(PROBATION_FRACTION * rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """2 / (1 + e^(5y)) - 1: +0.987 at y = -1, 0 at y = 0, towards -1 after; -1 beyond y = 3."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):
        value = 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0
    return np.where(y > 3.0, -1.0, value)


def load_profiles(path: str | Path) -> dict[str, Profile]:
    """The three profiles from NAB's config/profiles.json, keyed by our short names."""
    raw = json.loads(Path(path).read_text())
    out = {}
    for short, name in PROFILE_NAMES.items():
        cost = raw[name]["CostMatrix"]
        out[short] = Profile(tp=cost["tpWeight"], fp=cost["fpWeight"], fn=cost["fnWeight"])
    return out


def row_values(f: LabelledFile, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the window it lies in (-1: none) and what a detection there earns.

    Inside a window the value is the true-positive reward if it is the window's first detection;
    outside it is the (negative) false-positive cost. Probation rows get window -2 and value 0.
    """
    window = np.full(f.rows, -1, dtype=np.int64)
    value = np.full(f.rows, -profile.fp)
    rows = np.arange(f.rows)
    top = float(scaled_sigmoid(-1.0))
    for k, (first, last) in enumerate(sorted(f.windows)):
        width = last - first + 1
        inside = slice(first, last + 1)
        window[inside] = k
        value[inside] = profile.tp * scaled_sigmoid(-(last - rows[inside] + 1) / width) / top
        # Rows after this window (until the next one) are scored by their distance from it.
        after = rows > last
        after &= window == -1
        y = (rows[after] - last) / max(width - 1, 1)
        value[after] = profile.fp * scaled_sigmoid(y)
    window[: f.probation] = -2
    value[: f.probation] = 0.0
    return window, value


def _normalise(raw: float, windows: int, profile: Profile) -> float | None:
    null, perfect = -profile.fn * windows, profile.tp * windows
    return 100.0 * (raw - null) / (perfect - null) if perfect > null else None


def score(
    files: Sequence[LabelledFile],
    likelihoods: Sequence[np.ndarray],
    profile: Profile,
    threshold: float,
) -> Outcome:
    """The corpus scored with detections where likelihood >= threshold."""
    raw, detected, missed, fps, n_windows = 0.0, 0, 0, 0, 0
    for f, lik in zip(files, _checked(files, likelihoods), strict=True):
        window, value = row_values(f, profile)
        hit = (lik >= threshold) & (window != -2)
        outside = hit & (window == -1)
        raw += float(value[outside].sum())
        fps += int(outside.sum())
        for k in range(len(f.windows)):
            rows = np.flatnonzero(hit & (window == k))
            if len(rows):
                raw += float(value[rows[0]])
                detected += 1
            else:
                raw -= profile.fn
                missed += 1
        n_windows += len(f.windows)
    return Outcome(threshold, raw, _normalise(raw, n_windows, profile), detected, missed, fps)


def sweep(
    files: Sequence[LabelledFile], likelihoods: Sequence[np.ndarray], profile: Profile
) -> Outcome:
    """The threshold that maximises the corpus score, searched over every distinct likelihood."""
    liks, wins, vals = [], [], []
    offset = 0
    for f, lik in zip(files, _checked(files, likelihoods), strict=True):
        window, value = row_values(f, profile)
        scored = window != -2
        liks.append(lik[scored])
        wins.append(np.where(window[scored] >= 0, window[scored] + offset, -1))
        vals.append(value[scored])
        offset += len(f.windows)
    lik, win, val = np.concatenate(liks), np.concatenate(wins), np.concatenate(vals)
    order = np.argsort(-lik, kind="stable")
    lik, win, val = lik[order], win[order], val[order]
    # Lowering the threshold past a row adds its false-positive cost, or, inside a window,
    # raises that window's reward if the row is earlier than the window's detections so far.
    delta = np.where(win == -1, val, 0.0)
    best = np.full(offset, np.nan)
    for j in np.flatnonzero(win >= 0):
        k = win[j]
        if np.isnan(best[k]):
            delta[j], best[k] = val[j] + profile.fn, val[j]
        elif val[j] > best[k]:
            delta[j], best[k] = val[j] - best[k], val[j]
    total = -profile.fn * offset + np.cumsum(delta)
    # Only the last row of a run of equal likelihoods is a reachable threshold.
    ends = np.flatnonzero(np.r_[lik[1:] != lik[:-1], True])
    candidates = np.r_[-profile.fn * offset, total[ends]]
    pick = int(np.argmax(candidates))
    if pick == 0:
        above = np.nextafter(lik[0], np.inf) if len(lik) else 1.0
        return score(files, likelihoods, profile, float(above))
    return score(files, likelihoods, profile, float(lik[ends[pick - 1]]))


def _checked(files: Sequence[LabelledFile], likelihoods: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for f, lik in zip(files, likelihoods, strict=True):
        arr = np.asarray(lik, dtype=np.float64)
        if arr.shape != (f.rows,) or not np.isfinite(arr).all():
            raise ValueError(f"{f.name}: need {f.rows} finite likelihoods, got shape {arr.shape}")
        out.append(arr)
    return out
