"""`oteo benchmark smap DIR`: NASA SMAP / MSL telemetry by telemanom's protocol, with the product.

Per channel (labeled_anomalies.csv): a fresh model from the product's own trainer on the train
array only (`training.pipeline.train`, exported ONNX, today's defaults: what `oteo train` does with
no options, on all 25 columns), then every row of the test array decided causally by the shared
stages after the window score (training/bench/detection.py); each run of alarms is a predicted
sequence, scored by telemanom's event rule (training/bench/smap_scoring.py) and pooled per
spacecraft and in total. Rows are time (no timestamps; 1 s nominal period). Column 0 is the
telemetry value, columns 1..24 one-hot commands; `--columns 0` trains and scores column 0 alone.
A channel that cannot be trained on counts as failed, with its error, and its labelled sequences
as missed.

DIR is the SMAP_MSL folder (train/, test/, labeled_anomalies.csv), a folder holding it, or a folder
holding smap_msl_dev.tar.gz (or the tarball itself): a tarball is unpacked once into a cache folder
under the system's temporary directory, never beside the data or in the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from training.bench.smap_scoring import (
    EventCounts,
    LabelledChannel,
    Span,
    pooled,
    read_labels,
    read_published,
    rescore_published,
    score_channel,
    spans,
)
from training.preset import PRESETS

if TYPE_CHECKING:
    from daemon.manifest import AlarmPolicy
    from training.bench.cache import ScoreCache
    from training.bench.detection import Evidence
    from training.bench.scorer import WindowScorer
    from training.config import TrainOptions

log = logging.getLogger(__name__)

LABELS = "labeled_anomalies.csv"
PUBLISHED = "telemanom_published_dev.csv"
PERIOD_S = 1.0


class SmapDataError(click.ClickException):
    """The folder given is not SMAP / MSL data in the telemanom layout; the message says why."""


@dataclass(frozen=True)
class SmapData:
    """Where the arrays and labels are, and telemanom's published run if it came with them."""

    folder: Path  # holds train/, test/ and labeled_anomalies.csv
    published: Path | None


def locate(path: Path) -> SmapData:
    """The telemanom layout at, under or packed in `path` (see the module's docstring)."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return locate(unpack(path))
    for folder in (path, path / "SMAP_MSL", path / "smap_msl", path / "smap_msl" / "SMAP_MSL"):
        if (folder / LABELS).is_file() and (folder / "train").is_dir():
            published = next(
                (p for p in (folder / PUBLISHED, folder.parent / PUBLISHED) if p.is_file()), None
            )
            return SmapData(folder, published)
    for holder in (path, path / "smap_msl"):
        packed = sorted(holder.glob("*.tar.gz")) if holder.is_dir() else []
        if packed:
            return locate(unpack(packed[0]))
    raise SmapDataError(
        f"{path}: no SMAP_MSL folder (train/, test/, {LABELS}) and no smap_msl_dev.tar.gz here"
    )


def unpack(tarball: Path) -> Path:
    """Unpack `tarball` once into a cache folder named by its sha256 (reused afterwards)."""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"oteo-smap-msl-{digest}"
    if cache.is_dir():
        return cache
    scratch = Path(tempfile.mkdtemp(prefix=".oteo-smap-msl-", dir=cache.parent))
    try:
        with tarfile.open(tarball) as archive:
            # "data": no absolute paths, no links out of the folder, no device files.
            archive.extractall(scratch, filter="data")
        os.replace(scratch, cache)  # atomic: a reader never sees a half-unpacked cache
    except OSError:
        if not cache.is_dir():
            raise
    except tarfile.TarError as exc:
        raise SmapDataError(f"{tarball}: not a readable tarball ({exc})") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("unpacked %s into %s", tarball, cache)
    return cache


def load_array(folder: Path, part: str, chan: str) -> np.ndarray:
    """train/<chan>.npy or test/<chan>.npy as float64 [T, C]."""
    path = folder / part / f"{chan}.npy"
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SmapDataError(f"{path}: cannot read ({exc}); is the data folder complete?") from exc
    array = np.asarray(array, dtype=np.float64)
    return array[:, None] if array.ndim == 1 else array


@dataclass(frozen=True)
class Settings:
    """One configuration for every channel: a trainer preset, a seed, optionally fewer columns."""

    preset: str = "default"
    seed: int = 0
    columns: tuple[int, ...] | None = None  # None: all
    epochs: int | None = None  # None: the preset's
    extra: tuple[tuple[str, Any], ...] = ()  # any other training settings, by name

    def train_options(self, channels: int, name: str) -> TrainOptions:
        """The trainer's options for one channel (imports torch)."""
        from training.config import options_for

        extra = dict(self.extra)
        if self.epochs is not None:
            extra["max_epochs"] = self.epochs
        return options_for(
            self.preset, channels, seed=self.seed, progress=False, name=name, **extra
        )


@dataclass
class ChannelRun:
    """One channel's causal decisions on its test array and its event counts."""

    chan: LabelledChannel
    score: np.ndarray  # [T], NaN before the first full window
    alarm: np.ndarray  # [T] bool
    predicted: list[Span]
    counts: EventCounts
    seconds: float
    policy: AlarmPolicy | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def run_channel(
    data: SmapData,
    chan: LabelledChannel,
    settings: Settings,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> ChannelRun:
    """Fit on the train array, decide every test row causally, count events."""
    from training.bench.cache import ScoreCache, array_digest
    from training.bench.detection import detect, evidence
    from training.bench.scorer import Autoencoder, scorer_failures
    from training.data import from_array

    t0 = time.perf_counter()
    train = load_array(data.folder, "train", chan.chan_id)
    test = load_array(data.folder, "test", chan.chan_id)
    width = min(train.shape[1], test.shape[1])
    cols = list(range(width)) if settings.columns is None else list(settings.columns)
    if max(cols) >= width:
        raise SmapDataError(f"{chan.chan_id}: no column {max(cols)} (it has {width})")
    names = [f"c{c}" for c in cols]
    opts = settings.train_options(len(cols), chan.chan_id)
    scorer = scorer or Autoencoder()

    def compute() -> Evidence:
        train_table = from_array(train[:, cols], PERIOD_S, channels=names)
        fitted = scorer.fit(train_table, opts, workdir)
        return evidence(fitted, from_array(test[:, cols], PERIOD_S, channels=names), opts)

    cache = cache or ScoreCache(None)
    digest = array_digest(train[:, cols], test[:, cols])
    key = cache.key("smap", chan.chan_id, scorer.name, opts, digest)
    scored = cache.get("smap", key, compute, scorer_failures())
    found = detect(scored, opts)
    predicted = spans(found.rows.alarm)
    counts = score_channel(predicted, chan.sequences)
    seconds = time.perf_counter() - t0
    rows = found.rows
    return ChannelRun(
        chan,
        rows.detection,
        rows.alarm,
        predicted,
        counts,
        seconds,
        found.policy,
        notes=scored.notes,
    )


def run_or_fail(
    data: SmapData,
    chan: LabelledChannel,
    settings: Settings,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> ChannelRun:
    """`run_channel`, or a failed run (its sequences missed) naming the error."""
    from training.bench.scorer import scorer_failures

    t0 = time.perf_counter()
    try:
        return run_channel(data, chan, settings, workdir, scorer, cache)
    except SmapDataError:
        raise
    except scorer_failures() as exc:
        missed = EventCounts(fn=len(chan.sequences))
        empty = np.empty(0)
        seconds = time.perf_counter() - t0
        return ChannelRun(chan, empty, empty.astype(bool), [], missed, seconds, error=str(exc))


def summarise(runs: list[ChannelRun], seconds: float) -> dict[str, Any]:
    """Pooled and per-spacecraft numbers, failed channels, and per-channel counts."""
    counts = {r.chan.chan_id: r.counts for r in runs}
    table = pooled(counts, {r.chan.chan_id: r.chan.spacecraft for r in runs})
    rounded = {k: {m: round(v, 4) for m, v in t.items()} for k, t in table.items()}
    return {
        **rounded["all"],
        "SMAP": rounded["SMAP"],
        "MSL": rounded["MSL"],
        "failed": {r.chan.chan_id: r.error for r in runs if r.error},
        "seconds": round(seconds, 1),
        "per_channel": {
            r.chan.chan_id: {"tp": r.counts.tp, "fp": r.counts.fp, "fn": r.counts.fn} for r in runs
        },
    }


def published_summary(data: SmapData, chans: list[LabelledChannel]) -> dict[str, Any] | None:
    """telemanom's published run on the same channels, re-scored by our scorer."""
    if data.published is None:
        return None
    ours = rescore_published(chans, read_published(data.published))
    table = pooled(ours, {c.chan_id: c.spacecraft for c in chans})
    return {k: {m: round(v, 4) for m, v in t.items()} for k, t in table.items()}


def write_outputs(run: ChannelRun, out: Path, plot: bool = True) -> None:
    """<chan>/decisions.csv (row, score, alarm) and <chan>/score.png."""
    folder = out / run.chan.chan_id
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["row,score,alarm"]
    lines += [
        f"{i},{'' if s != s else f'{s:.6g}'},{int(a)}"
        for i, (s, a) in enumerate(zip(run.score.tolist(), run.alarm.tolist(), strict=True))
    ]
    (folder / "decisions.csv").write_text("\n".join(lines) + "\n")
    if not plot or run.policy is None:
        return
    from training.report import plot_scores

    label = np.zeros(len(run.alarm), dtype=bool)
    for first, last in run.chan.sequences:
        label[first : last + 1] = True
    rows = np.arange(len(run.alarm), dtype=np.float64) * PERIOD_S
    plot_scores(folder / "score.png", rows, run.score, run.alarm, label, run.policy)


def _line(name: str, t: dict[str, Any]) -> str:
    return (
        f"{name:22s}{t['precision']:10.3f}{t['recall']:8.3f}{t['f05']:8.3f}{t['f1']:8.3f}"
        f"{t['tp']:6d}{t['fp']:6d}{t['fn']:6d}{t['channels']:10d}"
    )


def _csv_list(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


@click.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Write <chan>/decisions.csv and plots here."
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="Training preset (default: what `oteo train` does with no options).",
)
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option("--columns", help="Array columns to train and score, e.g. 0 (default: all).")
@click.option("--only", help="Comma-separated channel ids (default: every labelled channel).")
@click.option("--epochs", type=int, help="Most epochs (default: the preset's).")
def smap(
    data: Path,
    as_json: bool,
    out: Path | None,
    preset: str,
    seed: int,
    columns: str | None,
    only: str | None,
    epochs: int | None,
) -> None:
    """SMAP / MSL (telemanom layout): a fresh model per channel, event precision / recall."""
    t0 = time.perf_counter()
    found = locate(data)
    chans = read_labels(found.folder / LABELS)
    if wanted := _csv_list(only):
        if unknown := sorted(set(wanted) - {c.chan_id for c in chans}):
            raise click.BadParameter(
                f"no labelled channel {', '.join(unknown)}", param_hint="--only"
            )
        chans = [c for c in chans if c.chan_id in wanted]
    try:
        cols = tuple(int(c) for c in _csv_list(columns) or []) or None
    except ValueError as exc:
        raise click.BadParameter(
            "give column numbers, e.g. 0 or 0,1", param_hint="--columns"
        ) from exc
    settings = Settings(preset, seed, cols, epochs)
    # The trainer warns that minutes of held-back data cannot confirm a daily false-alarm rate.
    logging.getLogger("training").setLevel(logging.ERROR)
    runs = []
    with tempfile.TemporaryDirectory(prefix="oteo-smap-") as tmp:
        for i, chan in enumerate(chans, 1):
            run = run_or_fail(found, chan, settings, Path(tmp))
            runs.append(run)
            if out is not None and run.error is None:
                write_outputs(run, out)
            c = run.counts
            status = f"failed: {run.error}" if run.error else f"TP {c.tp} FP {c.fp} FN {c.fn}"
            click.echo(
                f"[{i}/{len(chans)}] {chan.chan_id}  {status}  {run.seconds:.1f} s", err=True
            )
    summary = summarise(runs, time.perf_counter() - t0)
    if (published := published_summary(found, chans)) is not None:
        summary["published"] = published
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{'':22s}{'precision':>10s}{'recall':>8s}{'F0.5':>8s}{'F1':>8s}"
        f"{'TP':>6s}{'FP':>6s}{'FN':>6s}{'channels':>10s}"
    )
    for name in ("SMAP", "MSL"):
        click.echo(_line(f"oteo {name}", summary[name]))
    click.echo(_line("oteo (pooled)", {**summary, "channels": len(runs)}))
    if published:
        for name in ("SMAP", "MSL", "all"):
            label = "telemanom " + ("(pooled)" if name == "all" else name)
            click.echo(_line(label, published[name]))
    click.echo(f"{len(runs)} channels, {len(summary['failed'])} failed, {summary['seconds']} s")
