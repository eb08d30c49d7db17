"""`oteo benchmark nab DIR`: the NAB v1.1 protocol, run with the product's own trainer.

Per file, a fresh detector: `training.pipeline.train` on the probationary period only (the first
15 % of rows, at most 750), then every row's window score from the exported model through
`training.evaluate.causal_decisions`, then an anomaly likelihood in [0, 1] per row:
- as NAB's HTM detector does (Ahmad et al. 2017), how far the recent log score lies above the
  distribution of the previous `long` ones, as a Gaussian tail probability p, on NAB's log scale
  min(1, -log10(p) / 10). The distribution adapts, so a model fitted on two days still gives
  usable likelihoods weeks later, where a fixed p-value table from training would saturate. It
  starts from the held-back scores of the probationary period;
- a rise is reported once: a row keeps its likelihood only if it beats every likelihood of the
  previous `quiet` rows (else 0), as an alarm's cool-down would. NAB charges every detected row
  outside a window as a false positive, so a long excursion would otherwise cost dozens.
Row t uses rows <= t only.

The fixed threshold, chosen before any result was seen, is 0.5, i.e. p = 1e-5: the likelihood
level (0.99999) at which Numenta's own HTM deployments raise an alert.

Rows, not timestamps, are the time axis, as in NAB's protocol and scorer: a few files step back in
time (machine_temperature), repeat timestamps (ec2_request_latency) or report irregularly
(realTraffic); a regular grid would sort, merge or split those rows and let one see a later one.

Model settings: `--preset nab` (the default here, the README's table) is a small model chosen for
NAB (window 32, 32 hidden units, a 4-unit code, 30 epochs, thresholds from held-back windows);
`--preset default` is what `oteo train` does with no options (128 hidden units, a 16-unit code,
60 epochs, cross-fitted calibration scores when the held-back windows are few, as they are in a
probationary period), which the benchmark suite runs; `--preset small` the trainer's small preset.
The likelihood's calibration history starts from the scorer's calibration scores either way.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from training.bench.nab_scoring import PROFILE_NAMES, PROFILES, LabelledFile, load_profiles
from training.bench.nab_scoring import score as nab_score
from training.bench.nab_scoring import sweep as nab_sweep
from training.preset import PRESETS

if TYPE_CHECKING:
    from training.bench.cache import ScoreCache
    from training.bench.detection import Evidence
    from training.bench.scorer import WindowScorer
    from training.config import TrainOptions

# NAB's log scale: p = 1e-5 sits at 0.5 and p <= 1e-10 at 1.
LOG_SCALE_DECADES = 10.0
FIXED_THRESHOLD = 0.5


# `--preset nab`: the model settings of DetectorConfig; other names are the trainer's presets.
NAB_PRESET = "nab"


@dataclass(frozen=True)
class DetectorConfig:
    """One configuration for every file: no per-file constants, no labels."""

    # Model settings: NAB_PRESET for the ones below, else a trainer preset (training/preset.py).
    preset: str = NAB_PRESET
    # 32 samples (2.7 h of 5-minute data): long enough to see a shape, and still ~700 training
    # windows in a 750-row probationary period.
    window: int = 32
    # 32 hidden units and a 4-unit code: ~3k parameters for one channel's local shape.
    hidden: int = 32
    code_size: int = 4
    # The probationary period is at most 750 rows: a few hundred steps converge.
    max_epochs: int = 30
    patience: int = 6
    # Recent level: the newest window score alone (it already averages `window` samples; HTM
    # averages 10 raw scores), against the last 8640 (30 days of 5-minute data, as HTM).
    short: int = 1
    long: int = 8640
    # Floor on the spread of log scores: a change of under 10 % in error is never news.
    min_std: float = 0.1
    # A rise is reported once per day of 5-minute data.
    quiet: int = 288
    seed: int = 0
    # Any other training settings, by name, over a trainer preset (the benchmark suite's --set).
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass
class NabFile:
    """One series: raw rows in file order, as the scorer counts them."""

    path: Path
    labelled: LabelledFile
    stamps: list[str]  # as written, for predictions in NAB's layout
    seconds: np.ndarray  # float64 unix seconds [T], in file order
    values: np.ndarray  # float64 [T]


@dataclass
class FileRun:
    """One file's likelihood per row (all 0 if training failed, with the error)."""

    file: NabFile
    likelihood: np.ndarray  # [T] in [0, 1]
    seconds: float
    error: str | None = None
    score: np.ndarray | None = None  # [T] window score (NaN: no window yet), for the plot


def read_corpus(root: Path) -> list[NabFile]:
    """Every data/**.csv under a NAB folder, with its windows from labels/combined_windows.json."""
    import pandas as pd

    windows = json.loads((root / "labels" / "combined_windows.json").read_text())
    files = []
    for path in sorted((root / "data").rglob("*.csv")):
        name = path.relative_to(root / "data").as_posix()
        if name not in windows:
            continue  # not part of the labelled corpus
        frame = pd.read_csv(path)
        stamps = pd.to_datetime(frame["timestamp"], utc=True)
        seconds = ((stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy()
        rows = []
        for first, last in windows[name]:
            # The rows from the first at or after the window's start up to the last before the
            # first row past its end: file order, which is NAB's, also where time steps back.
            starts = np.flatnonzero(seconds >= _unix(first))
            if not len(starts):
                continue
            lo = int(starts[0])
            past = np.flatnonzero(seconds[lo:] > _unix(last))
            hi = lo + (int(past[0]) if len(past) else len(seconds) - lo) - 1
            if lo <= hi:
                rows.append((lo, hi))
        labelled = LabelledFile(name, len(frame), tuple(rows))
        stamp_text = frame["timestamp"].astype(str).tolist()
        values = frame["value"].to_numpy(dtype=np.float64)
        files.append(NabFile(path, labelled, stamp_text, seconds, values))
    return files


def _unix(stamp: str) -> float:
    import pandas as pd

    return float((pd.Timestamp(stamp, tz="UTC") - pd.Timestamp(0, tz="UTC")).total_seconds())


def likelihood(scores: np.ndarray, history: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    """Log-scale likelihood per score: the `short` mean vs the previous `long` log scores."""
    from scipy import stats

    seq = np.log(np.maximum(np.r_[history, scores], 1e-12))
    c1, c2 = np.r_[0.0, np.cumsum(seq)], np.r_[0.0, np.cumsum(seq**2)]
    at = len(history) + np.arange(len(scores))
    lo = np.maximum(at - cfg.short + 1, 0)
    recent = (c1[at + 1] - c1[lo]) / (at + 1 - lo)
    lo = np.maximum(at - cfg.long, 0)
    count = np.maximum(at - lo, 1)
    mean = (c1[at] - c1[lo]) / count
    std = np.sqrt(np.maximum((c2[at] - c2[lo]) / count - mean**2, 0.0))
    z = (recent - mean) / np.maximum(std, cfg.min_std)
    z = np.where(at > lo, z, -np.inf)  # no history yet: no evidence
    decades = -stats.norm.logsf(z) / np.log(10.0)
    return np.clip(decades / LOG_SCALE_DECADES, 0.0, 1.0)


def report_rises(lik: np.ndarray, quiet: int) -> np.ndarray:
    """`lik` where it beats every value of the previous `quiet` rows, else 0."""
    from numpy.lib.stride_tricks import sliding_window_view

    if quiet < 1 or not len(lik):
        return lik
    before = sliding_window_view(np.r_[np.full(quiet, -np.inf), lik[:-1]], quiet).max(axis=1)
    return np.where(lik > before, lik, 0.0)


def train_options(cfg: DetectorConfig, name: str) -> TrainOptions:
    """The trainer's options for one file: NAB's own model settings or a trainer preset."""
    from training.config import FitConfig, ModelConfig, TrainOptions, options_for

    if cfg.preset != NAB_PRESET:
        extra = dict(cfg.extra)
        return options_for(cfg.preset, 1, seed=cfg.seed, progress=False, name=name, **extra)
    return TrainOptions(
        model=ModelConfig(
            channels=1, window=cfg.window, hidden=cfg.hidden, code_size=cfg.code_size
        ),
        fit=FitConfig(
            max_epochs=cfg.max_epochs, patience=cfg.patience, seed=cfg.seed, progress=False
        ),
        name=name,
        # Held-back windows seed the likelihood; cross-fitting would cost 4 more fits per file.
        cross_fit=False,
    )


def window_scores(
    f: NabFile,
    cfg: DetectorConfig,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the causal window score (NaN: none yet), and the scorer's calibration scores."""
    from training.bench.cache import ScoreCache, array_digest
    from training.bench.detection import detect, evidence
    from training.bench.scorer import Autoencoder, scorer_failures
    from training.data import from_array

    steps = np.diff(f.seconds)
    # The period only labels the model file (rates per day); rows are the time axis.
    period = float(np.median(steps[steps > 0])) if (steps > 0).any() else 1.0
    opts = train_options(cfg, Path(f.labelled.name).stem)
    probation = f.labelled.probation
    scorer = scorer or Autoencoder()

    def compute() -> Evidence:
        train_table = from_array(f.values[:probation], period, channels=["value"])
        fitted = scorer.fit(train_table, opts, workdir)
        return evidence(fitted, from_array(f.values, period, channels=["value"]), opts)

    cache = cache or ScoreCache(None)
    key = cache.key("nab", f.labelled.name, scorer.name, opts, array_digest(f.values))
    found = cache.get("nab", key, compute, scorer_failures())
    score = detect(found, opts).rows.score
    return score, np.concatenate([s.score for s in found.calibration])


def run_file(
    f: NabFile,
    cfg: DetectorConfig,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> FileRun:
    """Train on the probationary period, score every row causally, return likelihoods."""
    t0 = time.perf_counter()
    score, seeds = window_scores(f, cfg, workdir, scorer, cache)
    usable = np.arange(len(score)) >= f.labelled.probation
    usable &= ~np.isnan(score)
    out = np.zeros(len(score))
    out[usable] = report_rises(likelihood(score[usable], seeds, cfg), cfg.quiet)
    return FileRun(f, out, time.perf_counter() - t0, score=score)


def run_or_fail(
    f: NabFile,
    cfg: DetectorConfig,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> FileRun:
    """`run_file`, or, for a file the scorer cannot learn from, no detections and the error."""
    from training.bench.scorer import scorer_failures

    try:
        return run_file(f, cfg, workdir, scorer, cache)
    except scorer_failures() as exc:
        # A file the product cannot learn from still counts: all its windows missed.
        return FileRun(f, np.zeros(f.labelled.rows), 0.0, error=str(exc))


def summarise(files: list[NabFile], runs: list[FileRun], root: Path, fixed: float) -> dict:  # type: ignore[type-arg]
    """Scores for the three profiles, optimised and at the fixed threshold, and what failed."""
    labelled = [f.labelled for f in files]
    liks = [r.likelihood for r in runs]
    profiles_path = root / "config" / "profiles.json"
    profiles = load_profiles(profiles_path) if profiles_path.exists() else PROFILES
    summary: dict = {"fixed": {"threshold": fixed}, "optimised": {}}  # type: ignore[type-arg]
    for name, profile in profiles.items():
        best = nab_sweep(labelled, liks, profile)
        at_fixed = nab_score(labelled, liks, profile, fixed)
        summary[name] = round(best.normalised, 2)
        summary["fixed"][name] = round(at_fixed.normalised, 2)
        summary["optimised"][name] = {
            "threshold": best.threshold,
            "detected_windows": best.detected_windows,
            "missed_windows": best.missed_windows,
            "false_positives": best.false_positives,
        }
    summary["windows"] = sum(len(f.windows) for f in labelled)
    summary["files"] = len(files)
    summary["failed"] = {r.file.labelled.name: r.error for r in runs if r.error}
    published = root / "final_results.json"
    if published.exists():
        table = json.loads(published.read_text())
        summary["published"] = {
            det: {k: round(v[PROFILE_NAMES[k]], 2) for k in PROFILE_NAMES}
            for det, v in table.items()
        }
    return summary


def write_outputs(run: FileRun, out: Path, thresholds: dict[str, float]) -> None:
    """NAB's results layout (timestamp,anomaly_score per row) and a plot beside it."""
    from training.report import plot_likelihood

    path = out / run.file.labelled.name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,anomaly_score"]
    lines += [f"{s},{v:.6f}" for s, v in zip(run.file.stamps, run.likelihood, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    f = run.file.labelled
    score = run.score if run.score is not None else np.full(f.rows, np.nan)
    windows = list(f.windows)
    plot_likelihood(
        path.with_suffix(".png"), score, run.likelihood, windows, f.probation, thresholds
    )


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option(
    "--fixed-threshold",
    default=FIXED_THRESHOLD,
    show_default=True,
    help="Likelihood threshold reported besides the optimised one (0.5 = p 1e-5).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write per-file likelihoods (timestamp,anomaly_score) and plots here.",
)
@click.option(
    "--preset",
    type=click.Choice([NAB_PRESET, *sorted(PRESETS)]),
    default=NAB_PRESET,
    show_default=True,
    help="Model settings: NAB's own small model (README table), or a trainer preset "
    "(default: what `oteo train` does with no options).",
)
@click.option("--seed", default=0, show_default=True, help="Training seed.")
def nab(
    data: Path, as_json: bool, fixed_threshold: float, out: Path | None, preset: str, seed: int
) -> None:
    """NAB v1.1: a fresh detector per file, scored for the three profiles."""
    if not (data / "labels" / "combined_windows.json").exists():
        raise click.ClickException(f"{data}: no labels/combined_windows.json (a NAB folder?)")
    files = read_corpus(data)
    if not files:
        raise click.ClickException(f"no labelled CSV under {data / 'data'}")
    # The trainer's calibration warns about the few held-back windows of a short probationary
    # period; the benchmark does not use those alarm thresholds.
    logging.getLogger("training").setLevel(logging.ERROR)
    cfg, runs, t0 = DetectorConfig(preset=preset, seed=seed), [], time.perf_counter()
    for i, f in enumerate(files, 1):
        with tempfile.TemporaryDirectory() as tmp:
            run = run_or_fail(f, cfg, Path(tmp))
        runs.append(run)
        status = f"error: {run.error}" if run.error else f"{run.seconds:.1f} s"
        click.echo(f"[{i}/{len(files)}] {f.labelled.name}  {status}", err=True)
    summary = summarise(files, runs, data, fixed_threshold)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        # The optimised threshold is known only once every file has run.
        best = summary["optimised"]["standard"]["threshold"]
        lines = {"fixed": fixed_threshold, "optimised (standard)": best}
        for run in runs:
            write_outputs(run, out, lines)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{'':24s}{'standard':>10s}{'low FP':>10s}{'low FN':>10s}")
    ours = [("oteo (optimised)", summary), (f"oteo (fixed {fixed_threshold:g})", summary["fixed"])]
    published = sorted(summary.get("published", {}).items(), key=lambda kv: -kv[1]["standard"])
    for name, s in ours + ([("published (whole corpus):", None)] if published else []) + published:
        if s is None:
            click.echo(name)
            continue
        click.echo(f"{name:24s}{s['standard']:10.1f}{s['low_fp']:10.1f}{s['low_fn']:10.1f}")
    click.echo(f"{len(files)} files, {len(summary['failed'])} failed, {summary['seconds']} s")
