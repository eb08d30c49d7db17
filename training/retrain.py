"""Retrain on recorded data: a challenger against the serving champion, promoted only if not worse.

1. Data: the recording's readings of the champion's channels (last `days`), per stream on the
   model's sample grid. Periods the daemon marked as alarm, muted or stale are left out with a
   margin on both sides (an alarm starts some windows after its cause). `normal_since` declares
   readings from that time on normal even where the daemon was in alarm: the operator's word
   that a new level (a new set point, a replaced sensor) is the machine's normal now.
2. Split per stream, in time order: the most recent `eval_fraction` of normal rows is the
   evaluation data; neither model has seen it. The challenger is trained by the ordinary
   pipeline on the rest (whose own tail calibrates its thresholds), with the champion's
   architecture, window, alarm policy and calibration rule.
3. Evaluation, champion and challenger on the same data, through the daemon's alarm replay:
   false-alarm events per day on the evaluation data, and the detection rate of faults of every
   kind injected into it with `training.fault.inject` (the same faults for both models). A fault
   counts as detected when the model was not already in alarm just before it and alarms during it
   or within one window after: a model that is always in alarm detects nothing.
4. Decision: promote when the challenger is not worse on false alarms (its events per day are
   no more than the champion's or within the champion's calibration target, or it spends less
   time in alarm: a champion stuck in alarm raises a single event) and its detection rate of
   every kind is at most `tolerance` below the champion's.
5. Labels (`training.labelled`): episodes operators labelled in the daemon's event journal.
   A `false_alarm` period is kept as training data; a `confirmed` one is left out. Both models
   are replayed on them: the challenger must raise fewer alarms on the false alarms and detect
   no fewer confirmed episodes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from daemon.alarm import count_events
from daemon.config import AlarmSection, apply_alarm_overrides
from daemon.detector import Stages
from daemon.journal import LabelledPeriod
from daemon.manifest import AlarmPolicy, Detection, utc_now
from daemon.model import Model
from daemon.recording import StreamRecording, read
from training.data import SensorTable, from_array, normal_segments, split_heldback
from training.fault import FAULT_KINDS, channel_scales, inject
from training.labelled import (
    LabelledSlice,
    LabelScore,
    is_false_alarm,
    label_reasons,
    label_score,
    read_labels,
    slices,
)

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
# Fault trials: the model sees this many windows of normal data before the fault (its alarm
# state settles as after a restart), the fault for FAULT_WINDOWS windows, and one window after.
LEAD_WINDOWS = 4
FAULT_WINDOWS = 2
SEPARATOR_ROWS = 8


class RetrainError(ValueError):
    """Retraining cannot run; the message is one line naming what and how to fix it."""


@dataclass(frozen=True)
class RetrainOptions:
    """What `oteo retrain` can set; defaults suit days of 1 Hz recordings."""

    streams: list[str] | None = None  # None: every recorded stream with the model's channels
    days: float | None = 7.0  # most recent days of data to use; None: all
    normal_since: float | None = None  # unix s: alarm marks from here on do not exclude data
    exclude_margin_s: float | None = None  # default: 2 windows + 60 s
    eval_fraction: float = 0.2
    calibration_fraction: float = 0.2  # of the training part: the challenger's calibration tail
    hidden: int = 128
    epochs: int = 60
    seed: int = 0
    fault_trials: int = 20  # per fault kind
    tolerance: float = 0.1  # allowed drop of a detection rate
    alarm: AlarmSection | None = None  # the daemon config's overrides, if it has any
    labels: Path | None = None  # the event journal; None: events.sqlite3 beside the recording
    use_labels: bool = True


@dataclass
class Scorecard:
    """One model's numbers on the evaluation data."""

    path: str
    sha256: str
    false_alarm_events: int
    false_alarms_per_day: float
    alarm_share: float  # share of evaluation windows in alarm (a permanent alarm is one event)
    detection_rate: dict[str, float]
    enter_threshold: float
    labelled: LabelScore = field(default_factory=LabelScore)

    def as_dict(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled.as_dict(),
            "path": self.path,
            "sha256": self.sha256,
            "false_alarm_events": self.false_alarm_events,
            "false_alarms_per_day": round(self.false_alarms_per_day, 4),
            "alarm_share": round(self.alarm_share, 4),
            "detection_rate": {k: round(v, 4) for k, v in self.detection_rate.items()},
            "enter_threshold": self.enter_threshold,
        }


@dataclass
class Outcome:
    """The decision, its reasons and the numbers behind it (the JSON report)."""

    decision: str  # "promote" or "keep"
    reasons: list[str]
    champion: Scorecard
    challenger: Scorecard
    data: dict[str, Any]
    promoted: bool = False
    promotion: str | None = None  # what --promote did, or why it refused
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "created": utc_now(),
            "decision": self.decision,
            "reasons": self.reasons,
            "promoted": self.promoted,
            "promotion": self.promotion,
            "champion": self.champion.as_dict(),
            "challenger": self.challenger.as_dict(),
            "data": self.data,
            "notes": self.notes,
        }


@dataclass
class _StreamData:
    name: str
    table: SensorTable
    train: list[tuple[int, int]]
    evaluation: list[tuple[int, int]]
    excluded_rows: int
    labelled: list[LabelledSlice] = field(default_factory=list)


# -- data ---------------------------------------------------------------------------------------


def _grid(rec: StreamRecording, since: float) -> tuple[np.ndarray, float]:
    """Readings on the sample grid from the first reading at or after `since` (last one wins)."""
    keep = rec.ts >= since
    ts, values = rec.ts[keep], rec.values[keep]
    t0 = float(ts[0])
    idx = np.rint((ts - t0) / rec.period_s).astype(np.int64)
    grid = np.full((int(idx[-1]) + 1, values.shape[1]), np.nan)
    for c in range(values.shape[1]):
        ok = np.isfinite(values[:, c])
        grid[idx[ok], c] = values[ok, c]  # numpy assigns in order: the latest reading wins
    return grid, t0


def _excluded(
    rec: StreamRecording,
    t0: float,
    rows: int,
    margin_s: float,
    opts: RetrainOptions,
    labels: list[LabelledPeriod],
) -> np.ndarray:
    """Rows of the grid inside a marked period, widened by the margin on both sides: alarm,
    muted and stale marks but labelled false alarms, and every confirmed episode."""
    times = t0 + rec.period_s * np.arange(rows)
    out = np.zeros(rows, dtype=bool)
    for mark in rec.marks:
        if mark.state == "alarm" and is_false_alarm(labels, mark.start_ts, mark.end_ts):
            continue  # the operator's word: it was normal operation
        start = mark.start_ts - margin_s
        end = np.inf if mark.end_ts is None else mark.end_ts + margin_s
        if mark.state == "alarm" and opts.normal_since is not None:
            end = min(end, opts.normal_since)
        if end >= start:
            out |= (times >= start) & (times <= end)
    for p in labels:
        if p.label == "confirmed":
            end = np.inf if p.end_ts is None else p.end_ts + margin_s
            out |= (times >= p.start_ts - margin_s) & (times <= end)
    return out


def load_streams(
    store: Path, champion: Model, opts: RetrainOptions, labels: list[LabelledPeriod] | None = None
) -> list[_StreamData]:
    """The recording, per stream: a table on the model's grid and its train / evaluation rows."""
    m = champion.manifest
    recs = [
        r
        for r in read(store, opts.streams)
        if r.channels == m.channels and abs(r.period_s - m.sample_period_s) < 1e-9 and len(r.ts)
    ]
    if not recs:
        raise RetrainError(
            f"{store}: no recorded readings of the model's {len(m.channels)} channels "
            f"{'for ' + ','.join(opts.streams) + ' ' if opts.streams else ''}"
            "(check record.streams in the daemon config and --streams)"
        )
    newest = max(float(r.ts[-1]) for r in recs)
    since = newest - opts.days * 86400 if opts.days is not None else -np.inf
    margin = opts.exclude_margin_s
    if margin is None:
        margin = 2 * m.window * m.sample_period_s + 60.0
    out = []
    for rec in recs:
        if not np.any(rec.ts >= since):
            continue
        grid, t0 = _grid(rec, since)
        own = [p for p in labels or [] if p.stream == rec.stream]
        excluded = _excluded(rec, t0, len(grid), margin, opts, own)
        table = from_array(
            grid,
            m.sample_period_s,
            channels=m.channels,
            labels={"anomaly": excluded},
            start_time=t0,
        )
        if not normal_segments(table):
            continue
        try:
            train, evaluation = split_heldback(table, opts.eval_fraction)
        except ValueError:
            continue
        labelled = slices(own, grid, t0, m.sample_period_s, m.window)
        out.append(_StreamData(rec.stream, table, train, evaluation, int(excluded.sum()), labelled))
    if not out:
        raise RetrainError(
            f"{store}: no normal data left after leaving out alarm, muted and stale periods; "
            "record longer, or pass --normal-since if the new level is the machine's normal"
        )
    return out


def training_table(streams: list[_StreamData], opts: RetrainOptions) -> tuple[SensorTable, float]:
    """Every stream's training rows in one table: first their fitting parts, then their
    calibration tails, NaN rows between pieces (no window spans two); and the tail's share."""
    channels = streams[0].table.channels
    period = streams[0].table.period_s
    fit_parts: list[np.ndarray] = []
    tail_parts: list[np.ndarray] = []
    for s in streams:
        lengths = [b - a for a, b in s.train]
        total = sum(lengths)
        cut = total - round(opts.calibration_fraction * total)
        done = 0
        for (a, b), n in zip(s.train, lengths, strict=True):
            head = max(0, min(n, cut - done))
            if head:
                fit_parts.append(s.table.values[a : a + head])
            if head < n:
                tail_parts.append(s.table.values[a + head : b])
            done += n
    # Longer than the 5-period gap from_array fills: pieces stay apart.
    gap = np.full((SEPARATOR_ROWS, len(channels)), np.nan)
    parts: list[np.ndarray] = []
    for piece in [*fit_parts, *tail_parts]:
        parts += [piece, gap]
    values = np.concatenate(parts)
    tail_rows = sum(len(p) for p in tail_parts)
    fit_rows = sum(len(p) for p in fit_parts)
    if fit_rows < 2 or tail_rows < 1:
        raise RetrainError("too little normal data to train on; record longer")
    table = from_array(values, period, channels=channels)
    table.source = "recording"
    return table, tail_rows / (tail_rows + fit_rows)


# -- evaluation ---------------------------------------------------------------------------------


def _policy(model: Model, opts: RetrainOptions) -> AlarmPolicy:
    policy = model.manifest.alarm
    return apply_alarm_overrides(policy, opts.alarm) if opts.alarm is not None else policy


def _alarm(model: Model, series: np.ndarray, policy: AlarmPolicy, stages: Stages) -> np.ndarray:
    """Per row of one contiguous [T, C] series, in alarm or not: the daemon's detection stages
    over its windows, as `oteo evaluate` replays them."""
    from training.evaluate import decide_rows

    m = model.manifest
    table = from_array(series, m.sample_period_s, channels=list(m.channels))
    return decide_rows(model, table, policy, stages=stages).alarm


def _eval_series(streams: list[_StreamData], window: int) -> list[np.ndarray]:
    return [s.table.values[a:b] for s in streams for a, b in s.evaluation if b - a >= window]


def _fault_trials(
    series: list[np.ndarray], scales: tuple[np.ndarray, np.ndarray], window: int, opts
) -> list[tuple[str, np.ndarray, int, int]]:
    """(kind, faulty slice, fault start row, fault stop row) for every trial, fixed by the seed."""
    lead, length = LEAD_WINDOWS * window, FAULT_WINDOWS * window
    need = lead + length + window
    usable = [s for s in series if len(s) >= need]
    if not usable:
        raise RetrainError(
            f"evaluation data has no stretch of {need} normal samples for fault trials; "
            "record longer or lower --eval-fraction"
        )
    rng = np.random.default_rng([opts.seed, 0xE7A1])
    trials = []
    for kind in FAULT_KINDS:
        for _ in range(opts.fault_trials):
            s = usable[int(rng.integers(len(usable)))]
            a = int(rng.integers(0, len(s) - need + 1))
            piece = s[a : a + need]
            faulty, _ = inject(piece, kind, lead, length, rng, scales=scales)
            trials.append((kind, faulty, lead, lead + length))
    return trials


def scorecard(
    model: Model, series, trials, opts: RetrainOptions, streams: list[_StreamData] | None = None
) -> Scorecard:
    """False alarms per day on the evaluation series and detection rate per fault kind."""
    policy = _policy(model, opts)
    stages = Stages.of(model.manifest).overridden(opts.alarm)  # with the config's overrides
    # Each series and fault trial is a period of a stream already running, not a new stream:
    # replayed without the warm-up (as calibration checks its false-alarm rate).
    stages = replace(stages, detection=stages.detection.model_copy(update={"warmup_s": None}))
    events = rows = in_alarm = windows = 0
    for s in series:
        active = _alarm(model, s, policy, stages)
        events += count_events(active)
        in_alarm += int(active.sum())
        windows += len(active)
        rows += len(s)
    days = rows * model.manifest.sample_period_s / 86400
    hits: dict[str, list[bool]] = {kind: [] for kind in FAULT_KINDS}
    for kind, faulty, start, stop in trials:
        active = _alarm(model, faulty, policy, stages)
        before, during = active[:start], active[start : stop + model.window]
        hits[kind].append(bool((not before.size or not before[-1]) and during.any()))
    labelled = label_score(
        [s for stream in streams or [] for s in stream.labelled],
        lambda values: _alarm(model, values, policy, stages),
        model.window,
    )
    return Scorecard(
        path=str(model.path),
        sha256=model.sha256,
        false_alarm_events=events,
        false_alarms_per_day=events / days if days > 0 else 0.0,
        alarm_share=in_alarm / windows if windows else 0.0,
        detection_rate={k: float(np.mean(v)) if v else 0.0 for k, v in hits.items()},
        enter_threshold=policy.enter_threshold,
        labelled=labelled,
    )


def decide(champion: Scorecard, challenger: Scorecard, target: float, tolerance: float):
    """("promote" | "keep", reasons): not worse on false alarms nor on any fault kind."""
    reasons = []
    allowed = max(champion.false_alarms_per_day, target)
    # A model stuck in alarm raises one event however long it lasts: events per day alone would
    # favour it, so more events only count as worse when more time is spent in alarm too.
    if challenger.false_alarms_per_day > allowed and challenger.alarm_share > champion.alarm_share:
        reasons.append(
            f"false alarms rose from {champion.false_alarms_per_day:.2f}/day to "
            f"{challenger.false_alarms_per_day:.2f}/day (allowed: {allowed:.2f}/day) and time "
            f"in alarm from {champion.alarm_share:.1%} to {challenger.alarm_share:.1%}"
        )
    for kind, rate in champion.detection_rate.items():
        new = challenger.detection_rate[kind]
        if new < rate - tolerance:
            reasons.append(
                f"detection of {kind} fell from {rate:.2f} to {new:.2f} (tolerance {tolerance:.2f})"
            )
    reasons += label_reasons(champion.labelled, challenger.labelled)
    if reasons:
        return "keep", reasons
    return "promote", [
        f"not worse: false alarms {challenger.false_alarms_per_day:.2f}/day "
        f"({challenger.alarm_share:.1%} of the time in alarm) vs "
        f"{champion.false_alarms_per_day:.2f}/day ({champion.alarm_share:.1%}), "
        f"every fault kind's detection within {tolerance:.2f}"
    ]


# -- the whole run ------------------------------------------------------------------------------


def retrain(store: Path, model_path: Path, out: Path, opts: RetrainOptions) -> Outcome:
    """Train a challenger on the recording, evaluate both models, write `out` and the report."""
    from training.config import FitConfig, ModelConfig, TrainOptions
    from training.pipeline import train

    if out.resolve() == model_path.resolve():
        raise RetrainError(f"--out {out} is the champion's file; write the challenger elsewhere")
    champion = Model.load(model_path)
    m = champion.manifest
    labels, labels_path = read_labels(store, opts.labels) if opts.use_labels else ([], None)
    streams = load_streams(store, champion, opts, labels)
    table, tail_share = training_table(streams, opts)
    cal = m.calibration
    named = {
        role: tuple(c for c, r in zip(m.channels, m.channel_roles(), strict=True) if r == role)
        for role in ("target", "context", "ignore")
    }
    train_opts = TrainOptions(
        model=ModelConfig(
            channels=len(m.channels),
            window=m.window,
            architecture=m.architecture,
            variant=m.variant,
            noise=m.noise,
            noise_level=m.noise_level if m.noise != "none" else 0.2,
            code_size=m.code_size,
            hidden=opts.hidden,
            hashing=m.hashable,
        ),
        fit=FitConfig(max_epochs=opts.epochs, seed=opts.seed, progress=False),
        name=m.name,
        version=_next_version(m.version),
        heldback_fraction=tail_share,
        quantile=cal.quantile,
        exit_quantile=cal.exit_quantile,
        false_alarms_per_day=cal.target_false_alarms_per_day,
        margin=cal.parameters.get("margin", 1.5),
        hop=m.alarm.hop,
        k=m.alarm.k,
        n=m.alarm.n,
        clear_windows=m.alarm.clear_windows,
        cooldown_windows=m.alarm.cooldown_windows,
        smoothing_alpha=m.alarm.smoothing_alpha,
        # The champion's channel roles, not new ones detected on the recording.
        targets=named["target"],
        context=named["context"],
        ignore=named["ignore"],
        **detection_options(m.detection or Detection.legacy()),
    )
    result = train(table, train_opts, out)
    challenger = Model.load(out)
    series = _eval_series(streams, m.window)
    train_values = np.concatenate([s.table.values[a:b] for s in streams for a, b in s.train])
    trials = _fault_trials(series, channel_scales(train_values), m.window, opts)
    champ_card = scorecard(champion, series, trials, opts, streams)
    chall_card = scorecard(challenger, series, trials, opts, streams)
    target = cal.target_false_alarms_per_day or 0.0
    decision, reasons = decide(champ_card, chall_card, target, opts.tolerance)
    eval_rows = sum(len(s) for s in series)
    data = {
        "store": str(store),
        "streams": [s.name for s in streams],
        "train_rows": int(sum(b - a for s in streams for a, b in s.train)),
        "excluded_rows": int(sum(s.excluded_rows for s in streams)),
        "eval_rows": int(eval_rows),
        "eval_hours": round(eval_rows * m.sample_period_s / 3600, 3),
        "fault_trials_per_kind": opts.fault_trials,
        "normal_since": opts.normal_since,
        "labels": str(labels_path) if labels_path is not None else None,
        "labelled_false_alarms": sum(p.label == "false_alarm" for p in labels),
        "labelled_confirmed": sum(p.label == "confirmed" for p in labels),
    }
    outcome = Outcome(decision, reasons, champ_card, chall_card, data)
    outcome.notes = [*result.notes, *result.manifest.calibration.warnings]
    return outcome


def write_report(outcome: Outcome, path: Path) -> Path:
    """The JSON report (written whole, then renamed into place)."""
    _atomic_write(path, (json.dumps(outcome.as_dict(), indent=2) + "\n").encode())
    outcome.report_path = path
    return path


def promote(outcome: Outcome, challenger: Path, live: Path, pinned_sha256: str | None) -> None:
    """Replace the live model with the challenger atomically (the daemon hot-reloads it)."""
    if outcome.decision != "promote":
        outcome.promotion = "not promoted: the challenger is worse (see reasons)"
        return
    if pinned_sha256 is not None:
        outcome.promotion = (
            f"refused: the daemon config pins model.sha256 = {pinned_sha256}; a new file would "
            f"be refused at reload. Set model.sha256 = {outcome.challenger.sha256}, copy "
            f"{challenger} to {live} and reload"
        )
        return
    try:
        _atomic_write(live, challenger.read_bytes())
    except OSError as exc:
        outcome.promotion = f"failed: cannot replace {live} ({exc.strerror}); the champion stays"
        return
    outcome.promoted = True
    outcome.promotion = f"replaced {live} (sha256 {outcome.challenger.sha256})"


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def detection_options(d: Detection) -> dict[str, Any]:
    """The TrainOptions that reproduce a manifest's detection stages (calibrated values aside)."""
    return {
        "sample": d.sample,
        "error": d.error,
        "normalise": d.normalise,
        "combine": d.combine,
        "baseline_samples": d.baseline_samples or 0,
        "baseline_rule": d.baseline_rule,
        "baseline_factor": d.baseline_factor,
        "baseline_in_alarm": d.baseline_in_alarm,
        "new_level_s": d.new_level_s or 0.0,
        "new_normal_s": d.new_normal_s or 0.0,
        "warmup_s": d.warmup_s or 0.0,
        "warmup_factor": d.warmup_factor,
        "baseline_learns_accepted": d.baseline_learns_accepted,
    }


def _next_version(version: str) -> str:
    return str(int(version) + 1) if version.isdigit() else f"{version}.r"
