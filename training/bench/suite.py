"""`oteo benchmark suite DATASETS_DIR`: SKAB valve1, NAB and SMAP/MSL dev with ONE configuration.

The product runs with its defaults: exactly what `oteo train` does with no options (the trainer's
"default" preset: dense denoising autoencoder, window 32, 128 hidden units, a 16-unit code, up to
60 epochs with early stopping, thresholds at the 0.999 quantile x 1.5 of held-back or
cross-fitted window scores, one false alarm per day, 3-of-5 alarm rule), the same for every file
of every set; only the training seed can be chosen (--seed). Beside it, two baselines
(training/bench/baseline.py): PCA reconstruction error and a seeded random score, fitted on the
same rows, calibrated on the same kind of held-back or cross-fitted windows and decided by the
same shared function
(training/bench/detection.py), so the columns differ by the window score alone.

Per set, each detector on the same protocol as the set's own command:
- SKAB valve1 (`oteo benchmark skab --preset default`): per file, fit on rows 0..399, decide every
  row causally, score rows 400..end: pooled F1, FAR, MAR, and the changepoint score (standard,
  low FP, low FN).
- NAB v1.1 (`oteo benchmark nab --preset default`): per file, fit on the probationary period; the
  detector's score per row in units of its enter threshold in force (both from the shared
  stages), r / (1 + r), a rise reported once per day of 5-minute data, as in that command; NAB's
  scorer at the threshold optimised per profile over the corpus, and at the fixed threshold 0.5,
  the product's own enter threshold.
- SMAP/MSL dev (`oteo benchmark smap`): per channel, fit on the train array (all 25 columns),
  decide every test row causally; runs of alarms are predicted sequences, scored by telemanom's
  event rule: precision, recall, F0.5, F1 pooled and per spacecraft; channels that failed to train
  count their sequences as missed.

Noise: give --seed several times (e.g. 0, 1, 2). The product and the random score run once per
seed (PCA has no seed and runs once); the table then shows the product's mean with its standard
deviation and range over the seeds, the run-to-run noise a change must beat.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from training.bench.cache import ScoreCache

log = logging.getLogger(__name__)

SETS = ("skab", "nab", "smap")
DETECTORS = ("oteo", "pca", "random")
PRODUCT = "oteo"
SEEDLESS = {"pca"}  # gives the same numbers for every seed: run once
PRESET = "default"  # the product's defaults: `oteo train` with no options

# (set, key, label) of every row of the table, in order.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("skab", "f1", "F1"),
    ("skab", "far", "FAR %"),
    ("skab", "mar", "MAR %"),
    ("skab", "changepoint_standard", "changepoint standard"),
    ("skab", "changepoint_low_fp", "changepoint low FP"),
    ("skab", "changepoint_low_fn", "changepoint low FN"),
    ("skab", "failed", "files failed"),
    ("skab", "seconds", "time s"),
    ("nab", "standard", "standard (optimised)"),
    ("nab", "low_fp", "low FP (optimised)"),
    ("nab", "low_fn", "low FN (optimised)"),
    ("nab", "fixed_standard", "standard (fixed 0.5)"),
    ("nab", "fixed_low_fp", "low FP (fixed 0.5)"),
    ("nab", "fixed_low_fn", "low FN (fixed 0.5)"),
    ("nab", "failed", "files failed"),
    ("nab", "seconds", "time s"),
    ("smap", "precision", "precision"),
    ("smap", "recall", "recall"),
    ("smap", "f05", "F0.5"),
    ("smap", "f1", "F1"),
    ("smap", "smap_precision", "SMAP precision"),
    ("smap", "smap_recall", "SMAP recall"),
    ("smap", "smap_f05", "SMAP F0.5"),
    ("smap", "msl_precision", "MSL precision"),
    ("smap", "msl_recall", "MSL recall"),
    ("smap", "msl_f05", "MSL F0.5"),
    ("smap", "failed", "channels failed"),
    ("smap", "seconds", "time s"),
)
SET_NAMES = {"skab": "SKAB valve1", "nab": "NAB", "smap": "SMAP/MSL dev"}


@dataclass
class SetResult:
    """One detector on one set: the table's numbers and the set's full summary."""

    numbers: dict[str, float]
    detail: dict[str, Any] = field(default_factory=dict)


Echo = Callable[[str], None]


@contextmanager
def _quiet() -> Iterator[None]:
    """The trainer's warnings about short held-back data, silenced for the run (it has 135
    models to train; the benchmarks report failures themselves)."""
    logger = logging.getLogger("training")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _scorer(name: str) -> Any:
    from training.bench.baseline import Pca, RandomScore
    from training.bench.scorer import Autoencoder

    return {"oteo": Autoencoder, "pca": Pca, "random": RandomScore}[name]()


@dataclass(frozen=True)
class Run:
    """What every set's runner is told: detector, seed, and the shared switches."""

    detector: str
    seed: int
    out: Path | None = None
    cache: ScoreCache | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # training settings over the defaults (--set)


def run_skab(root: Path, run: Run, echo: Echo) -> SetResult:
    """SKAB valve1 with the product's defaults (or a baseline): pooled numbers."""
    from training.bench import skab
    from training.bench.changepoint import pooled

    folder = root / "skab" / "valve1"
    files, skipped = skab.find_files(folder)
    if not files:
        raise click.ClickException(f"{folder}: no SKAB experiment (CSV with anomaly labels)")
    settings = skab.Settings(preset=PRESET, seed=run.seed, extra=run.extra)
    scorer, runs = _scorer(run.detector), []
    with tempfile.TemporaryDirectory(prefix="oteo-suite-") as tmp:
        for f in files:
            done = skab.run_or_fail(f, settings, Path(tmp), scorer, run.cache)
            runs.append(done)
            if run.out is not None and done.error is None:
                skab.write_outputs(done, run.out, plot=run.detector == PRODUCT)
    echo(f"{len(files)} files")
    summary: dict[str, Any] = dict(pooled([r.scored() for r in runs]))
    failed = {r.file.name: r.error for r in runs if r.error}
    summary.update(files=len(files), skipped=[list(s) for s in skipped], failed=failed)
    numbers = {k: float(summary[k]) for set_, k, _ in ROWS[:6] if set_ == "skab"}
    numbers["failed"] = float(len(failed))
    return SetResult(numbers, summary)


def run_nab(root: Path, run: Run, echo: Echo) -> SetResult:
    """NAB v1.1: the detector's score over its threshold in force, a rise reported once."""
    from training.bench import nab

    folder = root / "nab"
    if not (folder / "labels" / "combined_windows.json").is_file():
        raise click.ClickException(f"{folder}: no labels/combined_windows.json (NAB v1.1?)")
    files = nab.read_corpus(folder)
    cfg = nab.DetectorConfig(preset=PRESET, seed=run.seed, extra=run.extra)
    scorer, runs = _scorer(run.detector), []
    for f in files:
        with tempfile.TemporaryDirectory(prefix="oteo-suite-") as tmp:
            runs.append(nab.run_or_fail(f, cfg, Path(tmp), scorer, run.cache))
    echo(f"{len(files)} files")
    summary = nab.summarise(files, runs, folder, nab.FIXED_THRESHOLD)
    summary.pop("published", None)
    if run.out is not None:
        best = summary["optimised"]["standard"]["threshold"]
        lines = {"fixed": nab.FIXED_THRESHOLD, "optimised (standard)": best}
        for done in runs:
            nab.write_outputs(done, run.out, lines)
    numbers = {k: float(summary[k]) for k in ("standard", "low_fp", "low_fn")}
    numbers.update(
        {f"fixed_{k}": float(summary["fixed"][k]) for k in ("standard", "low_fp", "low_fn")}
    )
    numbers["failed"] = float(len(summary["failed"]))
    return SetResult(numbers, summary)


def run_smap(root: Path, run: Run, echo: Echo) -> SetResult:
    """SMAP/MSL dev by telemanom's event rule, all 25 columns."""
    from training.bench import smap
    from training.bench.smap_scoring import read_labels

    data = smap.locate(root / "smap_msl")
    chans = read_labels(data.folder / smap.LABELS)
    settings = smap.Settings(preset=PRESET, seed=run.seed, extra=run.extra)
    scorer, runs, t0 = _scorer(run.detector), [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oteo-suite-") as tmp:
        for i, chan in enumerate(chans, 1):
            done = smap.run_or_fail(data, chan, settings, Path(tmp), scorer, run.cache)
            runs.append(done)
            if run.out is not None and done.error is None:
                smap.write_outputs(done, run.out, plot=run.detector == PRODUCT)
            if i % 10 == 0 or i == len(chans):
                echo(f"{i}/{len(chans)} channels")
    summary = smap.summarise(runs, time.perf_counter() - t0)
    numbers = {k: float(summary[k]) for k in ("precision", "recall", "f05", "f1")}
    for craft in ("SMAP", "MSL"):
        for k in ("precision", "recall", "f05"):
            numbers[f"{craft.lower()}_{k}"] = float(summary[craft][k])
    numbers["failed"] = float(len(summary["failed"]))
    return SetResult(numbers, summary)


RUNNERS = {"skab": run_skab, "nab": run_nab, "smap": run_smap}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def table_lines(
    results: dict[str, dict[int, dict[str, SetResult]]], sets: list[str], seeds: list[int]
) -> list[str]:
    """The one table: a row per number of each set, a column per detector (means over seeds),
    and for several seeds the product's standard deviation and range."""
    detectors = list(results)
    noise = len(seeds) > 1 and PRODUCT in results
    head = f"{'set':14s}{'':24s}" + "".join(f"{d:>10s}" for d in detectors)
    if noise:
        head += f"{f'{PRODUCT} sd':>10s}{f'{PRODUCT} min..max':>20s}"
    lines = [head]
    for set_, key, label in ROWS:
        if set_ not in sets:
            continue
        cells = []
        for d in detectors:
            values = [results[d][s][set_].numbers[key] for s in results[d]]
            cells.append(_fmt(key, spread(values)["mean"]))
        line = f"{SET_NAMES[set_]:14s}{label:24s}" + "".join(f"{c:>10s}" for c in cells)
        if noise:
            s = spread([results[PRODUCT][seed][set_].numbers[key] for seed in seeds])
            rng = f"{_fmt(key, s['min'])}..{_fmt(key, s['max'])}"
            line += f"{_fmt(key, s['sd']):>10s}{rng:>20s}"
        lines.append(line)
    return lines


def _fmt(key: str, value: float) -> str:
    if key in ("failed", "seconds"):
        return f"{value:.0f}"
    if key in ("far", "mar") or key.startswith(("changepoint", "standard", "low", "fixed")):
        return f"{value:.2f}"
    return f"{value:.3f}"


@click.command()
@click.argument("datasets", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write each set's predictions here (<set>/<detector>/seed-<n>/; plots for oteo).",
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write everything as JSON to this file (to compare later runs with).",
)
@click.option(
    "--seed",
    "seeds",
    type=int,
    multiple=True,
    default=(0,),
    show_default=True,
    help="Training seed; give it several times to measure run-to-run noise.",
)
@click.option(
    "--sets",
    default=",".join(SETS),
    show_default=True,
    help="Comma-separated subset of skab, nab, smap.",
)
@click.option(
    "--detectors",
    default=",".join(DETECTORS),
    show_default=True,
    help="Comma-separated subset of oteo (the product), pca, random.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep every model's scores here and reuse them: a re-run that changes only the "
    "detection stages takes a minute (keep it outside the repository).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="A training setting over the defaults for every detector (e.g. baseline_samples=2000), to "
    "measure one change; repeatable. The table's title names them.",
)
def suite(
    datasets: Path,
    as_json: bool,
    out: Path | None,
    save: Path | None,
    seeds: tuple[int, ...],
    sets: str,
    detectors: str,
    cache: Path | None,
    settings: tuple[str, ...],
) -> None:
    """SKAB valve1, NAB and SMAP/MSL dev (folders skab/, nab/, smap_msl/ under DATASETS) with
    the product's defaults beside PCA and random baselines: one table."""
    # One BLAS thread, as torch gets one (training/fit.py): on this busy 2-core machine the PCA
    # baseline's matrix products ran 10x slower with OpenBLAS's two spinning threads (SMAP:
    # 388 s instead of ~60 s). Read when numpy loads, which the CLI has not done yet.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    chosen_sets = _choose(sets, SETS, "--sets")
    chosen = _choose(detectors, DETECTORS, "--detectors")
    extra = parse_settings(settings)
    from training.bench.cache import ScoreCache

    store = ScoreCache(cache) if cache is not None else None
    seed_list = list(dict.fromkeys(seeds))
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, SetResult]]] = {d: {} for d in chosen}
    with _quiet():
        for seed in seed_list:
            for set_ in chosen_sets:
                for d in chosen:
                    if d in SEEDLESS and results[d]:
                        first = next(iter(results[d]))
                        if set_ in results[d][first]:
                            results[d].setdefault(seed, {})[set_] = results[d][first][set_]
                            continue
                    where = out / set_ / d / f"seed-{seed}" if out is not None else None
                    tag = f"[seed {seed}] {SET_NAMES[set_]} {d}"
                    echo: Echo = lambda text, tag=tag: click.echo(f"{tag}: {text}", err=True)  # noqa: E731
                    started = time.perf_counter()
                    result = RUNNERS[set_](datasets, Run(d, seed, where, store, extra), echo)
                    result.numbers["seconds"] = round(time.perf_counter() - started, 1)
                    results[d].setdefault(seed, {})[set_] = result
                    echo(f"done in {result.numbers['seconds']:.0f} s")
    seconds = round(time.perf_counter() - t0, 1)
    everything = json.dumps(
        _as_json(results, chosen_sets, seed_list, seconds, dict(extra)), indent=2
    )
    if save is not None:
        save.write_text(everything + "\n")
    if as_json:
        click.echo(everything)
        return
    changed = " ".join(f"{k}={v}" for k, v in extra) or "none"
    click.echo(
        f"oteo benchmark suite: the product's defaults (`oteo train` with no options) beside "
        f"baselines through the same calibration and alarm policy; seeds {seed_list}; "
        f"settings changed: {changed}"
    )
    for line in table_lines(results, chosen_sets, seed_list):
        click.echo(line)
    click.echo(f"total {seconds:.0f} s")


def parse_settings(texts: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """NAME=VALUE pairs as training settings, each value typed like the setting's default."""
    from training.config import setting_field

    out = []
    for text in texts:
        name, sep, raw = text.partition("=")
        try:
            default = setting_field(name.strip()).default
        except KeyError:
            raise click.BadParameter(f"no training setting {name!r}", param_hint="--set") from None
        if not sep:
            raise click.BadParameter(f"{text!r}: give NAME=VALUE", param_hint="--set")
        try:
            value = _typed(raw.strip(), default)
        except ValueError as exc:
            raise click.BadParameter(f"{text!r}: {exc}", param_hint="--set") from None
        out.append((name.strip(), value))
    return tuple(out)


def _typed(raw: str, default: Any) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return raw.lower() in ("true", "1")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float) or default is None:
        try:
            return float(raw)
        except ValueError:
            if default is None:
                return raw
            raise
    return raw


def _choose(text: str, allowed: tuple[str, ...], hint: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    if not chosen or any(v not in allowed for v in chosen):
        raise click.BadParameter(f"choose from {', '.join(allowed)}", param_hint=hint)
    return [v for v in allowed if v in chosen]


def _as_json(
    results: dict[str, dict[int, dict[str, SetResult]]],
    sets: list[str],
    seeds: list[int],
    seconds: float,
    changed: dict[str, Any],
) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for set_, key, _ in ROWS:
        if set_ not in sets:
            continue
        row = table.setdefault(set_, {}).setdefault(key, {})
        for d in results:
            values = [results[d][s][set_].numbers[key] for s in results[d]]
            row[d] = spread(values)["mean"]
            if d == PRODUCT and len(seeds) > 1:
                row["noise"] = {**spread(values), "values": values}
    return {
        "configuration": f"the trainer's {PRESET!r} preset (`oteo train` with no options)",
        "settings_changed": changed,
        "seeds": seeds,
        "table": table,
        "details": {
            d: {
                str(s): {set_: r.detail for set_, r in by_set.items()} for s, by_set in runs.items()
            }
            for d, runs in results.items()
        },
        "seconds": seconds,
    }
