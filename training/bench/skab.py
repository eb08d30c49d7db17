"""`oteo benchmark skab DIR`: the published SKAB protocol, run with the product's own trainer.

Per file: a fresh model from `training.pipeline.train` on rows 0..399 only (its standardisation
and its cross-fitted thresholds see nothing else), then every row is decided causally by the
shared stages after the window score (training/bench/detection.py: the trainer's calibration and
the daemon's alarm code) and rows 400..end are scored (training/bench/changepoint.py). Rows, not
timestamps, are the time axis, as in SKAB's own models and scorer: the files step 2 s now and
then, and a grid would move "row 400" away from where the published predictions start.

`--preset small` (the default here, the README's table) or `--preset default` (what `oteo train`
does with no options; the benchmark suite runs that).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from daemon.manifest import AlarmPolicy
from training.bench.changepoint import FileScore, pooled, score_file
from training.preset import PRESETS

if TYPE_CHECKING:
    from training.bench.cache import ScoreCache
    from training.bench.detection import Evidence
    from training.bench.scorer import WindowScorer
    from training.config import TrainOptions

TRAIN_ROWS = 400
# The benchmark runs what users get with `oteo train --preset small`.
PRESET = "small"
LABELS = ("anomaly", "changepoint")
ARCHITECTURES = ("dense", "conv1d", "gru", "lstm")


class SkipFile(ValueError):
    """A CSV under the benchmark folder that is not a SKAB experiment; the message says why."""


@dataclass
class SkabFile:
    """One experiment: raw rows in file order, their labels and unix-second timestamps."""

    name: str
    datetimes: list[str]  # as written in the file, for predictions in the published layout
    timestamps: np.ndarray  # float64 unix seconds [T]
    values: np.ndarray  # float64 [T, C]
    channels: list[str]
    anomaly: np.ndarray  # int8 [T]
    changepoint: np.ndarray  # int8 [T]


def read_skab(path: Path, name: str | None = None) -> SkabFile:
    """Read a SKAB CSV (`;` or `,`); raise SkipFile if it lacks the labels or a datetime column."""
    import pandas as pd

    with path.open(encoding="utf-8-sig") as fh:
        head = fh.readline()
    sep = ";" if head.count(";") >= head.count(",") else ","
    try:
        frame = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SkipFile(f"not readable as CSV ({str(exc).splitlines()[0]})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    meta = (*LABELS, "datetime")
    if missing := [c for c in meta if c not in frame.columns]:
        raise SkipFile(f"no {', '.join(missing)} column")
    numeric = pd.api.types.is_numeric_dtype
    channels = [c for c in frame.columns if c not in meta and numeric(frame[c])]
    if not channels:
        raise SkipFile("no numeric sensor columns")
    if len(frame) <= TRAIN_ROWS:
        raise SkipFile(f"{len(frame)} rows: the protocol trains on the first {TRAIN_ROWS}")
    stamps = pd.to_datetime(frame["datetime"], errors="coerce", utc=True, format="ISO8601")
    if stamps.isna().any():
        raise SkipFile("unparseable datetime values")
    seconds = (stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return SkabFile(
        name=name or path.name,
        datetimes=frame["datetime"].astype(str).tolist(),
        timestamps=seconds.to_numpy(dtype=np.float64),
        values=frame[channels].to_numpy(dtype=np.float64),
        channels=channels,
        anomaly=(frame["anomaly"].fillna(0).to_numpy() > 0).astype(np.int8),
        changepoint=(frame["changepoint"].fillna(0).to_numpy() > 0).astype(np.int8),
    )


def find_files(root: Path) -> tuple[list[SkabFile], list[tuple[str, str]]]:
    """SKAB experiments under `root` in natural order (2.csv before 10.csv), and skipped CSVs."""
    paths = [root] if root.is_file() else list(root.rglob("*.csv"))
    key = lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(p))]  # noqa: E731
    found, skipped = [], []
    for path in sorted(paths, key=key):
        name = path.name if root.is_file() else str(path.relative_to(root))
        try:
            found.append(read_skab(path, name))
        except SkipFile as exc:
            skipped.append((name, str(exc)))
    return found, skipped


def _opt(text: str) -> Any:
    """A Settings field (None: the preset's value) whose help text the CLI option shows."""
    return field(default=None, metadata={"help": text})


@dataclass(frozen=True)
class Settings:
    """Trainer and alarm settings used for every file: a preset, and any values set over it."""

    preset: str = field(
        default=PRESET,
        metadata={"help": "Training preset: small (README table) or default (`oteo train`)."},
    )
    window: int | None = _opt("Samples per window.")
    architecture: str | None = _opt("Autoencoder architecture.")
    hidden: int | None = _opt("Hidden units.")
    code_size: int | None = _opt("Bottleneck units.")
    noise_level: float | None = _opt("Std of the denoising corruption.")
    scale_floor: float | None = _opt("Channel scale floor, x its magnitude.")
    quantile: float | None = _opt("Quantile of calibration scores: enter threshold.")
    margin: float | None = _opt("Multiply both thresholds by this.")
    k: int | None = _opt("Exceeding windows among the last n that raise an alarm.")
    n: int | None = _opt("Length of the k-of-n window.")
    smoothing: float | None = _opt("EWMA weight of the newest score (1 = none).")
    false_alarms_per_day: float | None = _opt("Event target on calibration scores (0 = none).")
    epochs: int | None = _opt("Most epochs (early stopping).")
    seed: int = field(default=0, metadata={"help": "Training seed."})
    # Any other training settings, by name (the benchmark suite's --set); not a CLI option here.
    extra: tuple[tuple[str, Any], ...] = field(default=(), metadata={"cli": False})

    def train_options(self, channels: int, name: str) -> TrainOptions:
        """The TrainOptions these settings mean: the preset with these values (imports torch)."""
        from training.config import options_for

        given = {
            _TRAIN_NAMES.get(f.name, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("preset", "extra") and getattr(self, f.name) is not None
        }
        given.update(self.extra)
        if given.get("false_alarms_per_day") == 0:
            given["false_alarms_per_day"] = None
        opts = options_for(self.preset, channels, **given, progress=False, name=name)
        if not 1 <= opts.k <= opts.n:
            raise ValueError(f"need 1 <= k <= n, got k={opts.k}, n={opts.n}")
        if not (0 < opts.smoothing_alpha <= 1 and 0 < opts.quantile < 1):
            raise ValueError("need 0 < smoothing <= 1 and 0 < quantile < 1")
        return opts


@dataclass
class FileRun:
    """One file's causal decisions over all rows (score NaN before the first full window)."""

    file: SkabFile
    score: np.ndarray
    alarm: np.ndarray
    policy: AlarmPolicy | None
    seconds: float
    error: str | None = None  # training failed: every row decided normal

    def scored(self) -> FileScore:
        f, t = self.file, slice(TRAIN_ROWS, None)
        return score_file(f.timestamps[t], f.anomaly[t], f.changepoint[t], self.alarm[t])


def run_file(
    file: SkabFile,
    settings: Settings,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> FileRun:
    """Fit on rows 0..399 of `file` (the product's autoencoder unless another scorer is given),
    then decide every row causally."""
    from training.bench.cache import ScoreCache, array_digest
    from training.bench.detection import detect, evidence
    from training.bench.scorer import Autoencoder, scorer_failures
    from training.data import from_array

    t0 = time.perf_counter()
    scorer = scorer or Autoencoder()
    stem = Path(file.name).with_suffix("").as_posix().replace("/", "_")
    opts = settings.train_options(len(file.channels), stem)

    def compute() -> Evidence:
        # No labels in the training table: the detector must not learn from them.
        head = from_array(file.values[:TRAIN_ROWS], 1.0, channels=file.channels)
        fitted = scorer.fit(head, opts, workdir)
        # The full table lets windows ending at row >= 400 reach back into the training rows.
        return evidence(fitted, from_array(file.values, 1.0, channels=file.channels), opts)

    cache = cache or ScoreCache(None)
    key = cache.key("skab", file.name, scorer.name, opts, array_digest(file.values))
    found = detect(cache.get("skab", key, compute, scorer_failures()), opts)
    rows = found.rows
    return FileRun(file, rows.detection, rows.alarm, found.policy, time.perf_counter() - t0)


def run_or_fail(
    file: SkabFile,
    settings: Settings,
    workdir: Path,
    scorer: WindowScorer | None = None,
    cache: ScoreCache | None = None,
) -> FileRun:
    """`run_file`, or a run that never alarms and says why when the file cannot be trained on."""
    from training.bench.scorer import scorer_failures

    t0 = time.perf_counter()
    try:
        return run_file(file, settings, workdir, scorer, cache)
    except scorer_failures() as exc:
        rows = len(file.values)
        never = np.zeros(rows, dtype=bool)
        return FileRun(file, np.full(rows, np.nan), never, None, time.perf_counter() - t0, str(exc))


def write_outputs(run: FileRun, out: Path, plot: bool = True) -> None:
    """Predictions for rows 400..end as `datetime;anomaly_pred`, and a score plot."""
    from training.report import plot_scores

    f = run.file
    target = out / Path(f.name).with_suffix(".csv")
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = zip(f.datetimes[TRAIN_ROWS:], run.alarm[TRAIN_ROWS:].astype(int).tolist(), strict=True)
    target.write_text("datetime;anomaly_pred\n" + "".join(f"{d};{a}\n" for d, a in rows))
    if not plot or run.policy is None:
        return
    label = f.anomaly.astype(bool)
    trained = float(f.timestamps[TRAIN_ROWS - 1])
    plot_scores(
        target.with_suffix(".png"), f.timestamps, run.score, run.alarm, label, run.policy, trained
    )


def score_predictions(files: list[SkabFile], predictions: Path) -> list[FileScore]:
    """Score published-layout predictions (`datetime;anomaly_pred`), matched on datetime."""
    import pandas as pd

    scores = []
    for f in files:
        path = predictions / Path(f.name).with_suffix(".csv")
        if not path.is_file():
            raise click.ClickException(f"no predictions for {f.name} ({path})")
        pred = pd.read_csv(path, sep=";")
        flag = dict(
            zip(pred["datetime"].astype(str), pred["anomaly_pred"].astype(int), strict=True)
        )
        rows = np.array([d in flag for d in f.datetimes])
        alarm = np.array([flag[d] for d in np.asarray(f.datetimes)[rows]], dtype=bool)
        scores.append(score_file(f.timestamps[rows], f.anomaly[rows], f.changepoint[rows], alarm))
    return scores


def _summary(
    scores: list[FileScore], files: int, skipped: list[tuple[str, str]], seconds: float
) -> dict[str, Any]:
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in pooled(scores).items()}
    return {**out, "files": files, "skipped": [list(s) for s in skipped], "seconds": seconds}


def _line(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name}: F1 {s['f1']:.2f}  FAR {s['far']:.2f} %  MAR {s['mar']:.2f} %  changepoint "
        f"{s['changepoint_standard']:.2f} / low FP {s['changepoint_low_fp']:.2f} / low FN "
        f"{s['changepoint_low_fn']:.2f}  (missed {s['missed_changepoints']}/"
        f"{s['changepoints']}, false {s['false_changepoints']})"
    )


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Errors only from `name`: 400 rows always draw the trainer's short-data warnings."""
    logger, level = logging.getLogger(name), logging.getLogger(name).level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _settings_options(command: Any) -> Any:
    """One CLI option per Settings field, with its help: defined once. Unset options take the
    preset's value; the help shows the small preset's."""
    hints = Settings.__annotations__
    for f in reversed([f for f in fields(Settings) if f.metadata.get("cli", True)]):
        flag = "--" + f.name.replace("_", "-")
        kind: Any
        if f.name == "architecture":
            kind = click.Choice(ARCHITECTURES)
        elif f.name == "preset":
            kind = click.Choice(sorted(PRESETS))
        else:
            kind = float if "float" in str(hints[f.name]) else int
        text = f.metadata["help"]
        small = PRESETS[PRESET].values.get(_TRAIN_NAMES.get(f.name, f.name))
        if f.default is None and small is not None:
            text += f" [small: {small}]"
        option = click.option(flag, f.name, type=kind, default=f.default, help=text)
        command = option(command)
    return command


# Settings fields whose trainer setting has another name.
_TRAIN_NAMES = {"smoothing": "smoothing_alpha", "epochs": "max_epochs"}


@click.command(context_settings={"show_default": True})
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the pooled numbers as JSON.")
@click.option("--out", type=click.Path(path_type=Path), help="Write predictions and plots here.")
@click.option(
    "--predictions",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Only score these published-layout predictions (datetime;anomaly_pred), no training.",
)
@_settings_options
def skab(data: Path, as_json: bool, out: Path | None, predictions: Path | None, **kw: Any) -> None:
    """SKAB protocol on every labelled CSV under DATA: train on rows 0..399, score 400..end."""
    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    files, skipped = find_files(data)
    for name, why in skipped:
        click.echo(f"skipped {name}: {why}", err=True)
    if not files:
        raise click.ClickException(f"no CSV with {' and '.join(LABELS)} columns under {data}")
    if predictions is not None:
        scores = score_predictions(files, predictions)
    else:
        try:
            settings = Settings(**kw)
            settings.train_options(len(files[0].channels), "check")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        scores = []
        with tempfile.TemporaryDirectory(prefix="oteo-skab-") as tmp, _quiet("training"):
            for i, f in enumerate(files, 1):
                run = run_or_fail(f, settings, Path(tmp))
                scores.append(run.scored())
                if run.error is not None:
                    failed[f.name] = run.error
                    click.echo(f"[{i}/{len(files)}] {f.name} failed: {run.error}", err=True)
                    continue
                if out is not None:
                    write_outputs(run, out)
                line = _line(f.name, _summary([scores[-1]], 1, [], 0.0))
                click.echo(f"[{i}/{len(files)}] {line}  {run.seconds:.1f} s", err=True)
    summary = _summary(scores, len(files), skipped, round(time.perf_counter() - t0, 1))
    summary["failed"] = failed
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(_line(f"{len(files)} files", summary))
    if failed:
        click.echo(f"{len(failed)} file(s) failed to train (every row counted normal)")
    click.echo(f"time: {summary['seconds']:.1f} s")
