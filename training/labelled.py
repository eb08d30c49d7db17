"""Operators' labels in retraining: what they change in the data, and how both models fare on them.

The daemon's event journal (`state_dir/events.sqlite3`, beside the recording) holds the labels
operators gave alarm episodes. Retraining reads them:
- a `false_alarm` episode was normal operation: its alarm period is kept as training data (not
  left out as other alarm periods are), so the challenger learns it;
- a `confirmed` episode was a real fault: its period is left out with the usual margin, even
  after `--normal-since`.
Both models are then replayed on every labelled period (with a lead of normal data before it,
so the alarm state settles as in the daemon): the challenger must raise fewer alarms on the
false alarms (when the champion raised any) and must not detect fewer confirmed episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.alarm import count_events
from daemon.journal import FILE_NAME, LabelledPeriod, read_labelled

# Rows of data before a labelled period that its replay starts with, in windows.
LEAD_WINDOWS = 4


def read_labels(store: Path, journal: Path | None) -> tuple[list[LabelledPeriod], Path | None]:
    """The labelled periods of `journal`, or of the journal beside the recording if there is one."""
    path = journal if journal is not None else store.parent / FILE_NAME
    if journal is None and not path.is_file():
        return [], None
    return read_labelled(path), path  # JournalError (a ValueError) names the file


def is_false_alarm(periods: list[LabelledPeriod], start_ts: float, end_ts: float | None) -> bool:
    """An alarm mark [start, end] of a stream is a labelled false alarm (same episode start)."""
    for p in periods:
        if p.label != "false_alarm":
            continue
        p_end = np.inf if p.end_ts is None else p.end_ts
        m_end = np.inf if end_ts is None else end_ts
        if start_ts <= p_end and p.start_ts <= m_end:
            return True
    return False


@dataclass(frozen=True)
class LabelledSlice:
    """One labelled period of one stream, on the model's grid, with its lead."""

    label: str
    event_id: str
    values: np.ndarray  # [T, C] lead rows, then the period
    start: int  # first row of the period in `values`
    stop: int  # one past its last row


def slices(
    periods: list[LabelledPeriod], grid: np.ndarray, t0: float, period_s: float, window: int
) -> list[LabelledSlice]:
    """The labelled periods that lie in one stream's grid (t0 = time of row 0)."""
    out = []
    for p in periods:
        end = p.end_ts if p.end_ts is not None else t0 + period_s * (len(grid) - 1)
        a = int(np.floor((p.start_ts - t0) / period_s))
        b = int(np.ceil((end - t0) / period_s)) + 1
        lead = LEAD_WINDOWS * window
        lo, hi = max(0, a - lead), min(len(grid), b)
        if a < 0 or hi - lo < window + 1 or a >= hi:
            continue
        out.append(LabelledSlice(p.label, p.event_id, grid[lo:hi], a - lo, hi - lo))
    return out


@dataclass
class LabelScore:
    """One model replayed on the labelled periods."""

    false_alarm_periods: int = 0
    false_alarm_events: int = 0  # alarms it raised on them
    false_alarm_share: float = 0.0  # share of their windows in alarm
    confirmed_periods: int = 0
    confirmed_detected: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "false_alarm_periods": self.false_alarm_periods,
            "false_alarm_events": self.false_alarm_events,
            "false_alarm_share": round(self.false_alarm_share, 4),
            "confirmed_periods": self.confirmed_periods,
            "confirmed_detected": self.confirmed_detected,
        }


def label_score(
    labelled: list[LabelledSlice], alarm: Callable[[np.ndarray], np.ndarray], window: int
) -> LabelScore:
    """Replay one model (`alarm`: per-row alarm of a [T, C] series) on the labelled periods."""
    score = LabelScore()
    in_alarm = rows = 0
    for s in labelled:
        active = alarm(s.values)
        period = active[s.start : s.stop]
        if s.label == "false_alarm":
            score.false_alarm_periods += 1
            # An alarm carried in from the lead counts once too: it is on during the period.
            score.false_alarm_events += count_events(period)
            in_alarm += int(period.sum())
            rows += len(period)
        else:
            score.confirmed_periods += 1
            score.confirmed_detected += bool(active[s.start : s.stop + window].any())
    score.false_alarm_share = in_alarm / rows if rows else 0.0
    return score


def label_reasons(champion: LabelScore, challenger: LabelScore) -> list[str]:
    """Why the challenger must not be promoted, on the labelled periods ([] if it may)."""
    reasons = []
    if champion.false_alarm_events and challenger.false_alarm_events >= champion.false_alarm_events:
        reasons.append(
            f"on the {champion.false_alarm_periods} periods labelled false_alarm the challenger "
            f"raised {challenger.false_alarm_events} alarms, the champion "
            f"{champion.false_alarm_events}: not fewer"
        )
    if challenger.confirmed_detected < champion.confirmed_detected:
        reasons.append(
            f"the challenger detects {challenger.confirmed_detected} of the "
            f"{challenger.confirmed_periods} confirmed episodes, the champion "
            f"{champion.confirmed_detected}"
        )
    return reasons
