"""Event-level scoring of the telemanom protocol (Hundman et al., KDD 2018) for SMAP / MSL.

Per channel, predicted and labelled anomalies are sequences of test rows, [first, last] both
included (labeled_anomalies.csv writes them so):
- a labelled sequence that at least one predicted sequence overlaps is a true positive; each
  labelled sequence counts once, however many predictions overlap it;
- a predicted sequence that overlaps no labelled sequence is a false positive;
- a labelled sequence that no prediction overlaps is a false negative.
Counts are pooled over channels (per spacecraft and in total) before precision, recall and
F-beta are computed. A prediction that overlaps two labelled sequences makes both true positives
here; telemanom's own code credits only the first of them (no channel of the published dev run
has such a prediction, so the published counts come out the same either way).

Torch-free and pandas-free: reading the label and published-results CSVs needs only the stdlib.
"""

from __future__ import annotations

import ast
import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Span = tuple[int, int]  # first and last row of a sequence, both included
SPACECRAFT = ("SMAP", "MSL")


@dataclass(frozen=True)
class EventCounts:
    """True / false positive and false negative sequences, summed over any number of channels."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 0 when nothing was predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 0 when nothing was labelled."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    def f_beta(self, beta: float) -> float:
        """(1 + b^2) P R / (b^2 P + R); beta < 1 weighs precision more (F0.5: twice)."""
        p, r = self.precision, self.recall
        return (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0

    def table(self) -> dict[str, float | int]:
        """The numbers a report shows: precision, recall, F0.5, F1 and the counts."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f05": self.f_beta(0.5),
            "f1": self.f_beta(1.0),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


@dataclass(frozen=True)
class LabelledChannel:
    """One channel of labeled_anomalies.csv: its spacecraft, test rows and anomaly sequences."""

    chan_id: str
    spacecraft: str
    sequences: tuple[Span, ...]
    rows: int | None  # num_values: rows of the test array, when the file gives it


def spans(mask: np.ndarray) -> list[Span]:
    """[first, last] rows (both included) of every run of True in a boolean series."""
    m = np.r_[False, np.asarray(mask, dtype=bool), False].astype(np.int8)
    change = np.flatnonzero(np.diff(m))
    return [(int(a), int(b) - 1) for a, b in zip(change[::2], change[1::2], strict=True)]


def overlaps(a: Span, b: Span) -> bool:
    """Whether two inclusive row ranges share a row."""
    return a[0] <= b[1] and b[0] <= a[1]


def score_channel(predicted: Sequence[Span], labelled: Sequence[Span]) -> EventCounts:
    """TP / FP / FN sequences of one channel by telemanom's overlap rule."""
    for first, last in (*predicted, *labelled):
        if first > last:
            raise ValueError(f"sequence [{first}, {last}] ends before it starts")
    hit = sum(any(overlaps(p, t) for p in predicted) for t in labelled)
    false = sum(not any(overlaps(p, t) for t in labelled) for p in predicted)
    return EventCounts(tp=hit, fp=false, fn=len(labelled) - hit)


def pooled(
    counts: Mapping[str, EventCounts], spacecraft: Mapping[str, str]
) -> dict[str, dict[str, float | int]]:
    """The table per spacecraft and in total ("all") from per-channel counts."""
    out: dict[str, dict[str, float | int]] = {}
    groups = [("all", list(counts))]
    groups += [(s, [c for c in counts if spacecraft.get(c) == s]) for s in SPACECRAFT]
    for name, chans in groups:
        total = sum((counts[c] for c in chans), EventCounts())
        out[name] = {**total.table(), "channels": len(chans)}
    return out


def _parse_spans(text: str, where: str) -> tuple[Span, ...]:
    try:
        value = ast.literal_eval(text.strip() or "[]")
        return tuple((int(a), int(b)) for a, b in value)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ValueError(f"{where}: not a list of [start, end] pairs: {text!r}") from exc


def read_labels(path: Path) -> list[LabelledChannel]:
    """labeled_anomalies.csv, one entry per channel in file order.

    The upstream file lists P-2 twice, with two different sequences; the first row of a channel
    is kept (it is the one telemanom's published run was scored against) and the repeat logged.
    """
    out: dict[str, LabelledChannel] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"chan_id", "spacecraft", "anomaly_sequences"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no {', '.join(sorted(missing))} column")
        for n, row in enumerate(reader, start=2):
            chan = row["chan_id"].strip()
            where = f"{path.name} line {n} ({chan}): anomaly_sequences"
            sequences = _parse_spans(row["anomaly_sequences"], where)
            if chan in out:
                log.info("%s: %s listed again on line %d; kept its first row", path.name, chan, n)
                continue
            rows = row.get("num_values")
            out[chan] = LabelledChannel(
                chan, row["spacecraft"].strip(), sequences, int(rows) if rows else None
            )
    return list(out.values())


@dataclass(frozen=True)
class PublishedChannel:
    """One channel of telemanom's published run: its predicted sequences and its own counts."""

    chan_id: str
    predicted: tuple[Span, ...]
    counts: EventCounts


def read_published(path: Path) -> list[PublishedChannel]:
    """telemanom_published_dev.csv: predictions = tp_sequences + fp_sequences; first row per
    channel (the file repeats P-2, as labeled_anomalies.csv does)."""
    out: dict[str, PublishedChannel] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            chan = row["chan_id"].strip()
            if chan in out:
                continue
            where = f"{path.name} line {n} ({chan})"
            predicted = _parse_spans(row["tp_sequences"], f"{where}: tp_sequences")
            predicted += _parse_spans(row["fp_sequences"], f"{where}: fp_sequences")
            counts = EventCounts(
                int(row["true_positives"]), int(row["false_positives"]), int(row["false_negatives"])
            )
            out[chan] = PublishedChannel(chan, tuple(sorted(predicted)), counts)
    return list(out.values())


def rescore_published(
    labels: Iterable[LabelledChannel], published: Iterable[PublishedChannel]
) -> dict[str, EventCounts]:
    """Our counts for telemanom's published predictions, per labelled channel (none: all FN)."""
    predicted = {p.chan_id: p.predicted for p in published}
    return {c.chan_id: score_channel(predicted.get(c.chan_id, ()), c.sequences) for c in labels}
