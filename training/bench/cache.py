"""A cache of scorers' outputs for the benchmarks: training and scoring are the costly part.

What a fitted scorer gives the stages after it (training.bench.detection.Evidence: calibration
windows' scores and every window of the test table, per channel too) depends on the data, the
scorer, the settings that shape the model, the seed and the code that trains and scores; the
stages after it (thresholds, smoothing, baselines, alarm policy) do not change it. With a cache
folder (`--cache DIR`), a benchmark re-run that changes only those stages reads the outputs back
instead of training again: a sweep over detection settings takes a minute, not a quarter hour.
The key covers everything else, including a digest of the training code, so a stale entry is
never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.calibrate import Series
from training.evaluate import WindowOutputs

if TYPE_CHECKING:
    from training.bench.detection import Evidence
    from training.config import TrainOptions

log = logging.getLogger(__name__)

CACHE_VERSION = 4
# Settings used only after the window score, and labels: they never change a scorer's outputs.
DETECTION_SETTINGS = frozenset(
    {
        "name",
        "version",
        "quantile",
        "exit_quantile",
        "false_alarms_per_day",
        "margin",
        "k",
        "n",
        "clear_windows",
        "cooldown_windows",
        "smoothing_alpha",
        "error",
        "sample",
        "normalise",
        "combine",
        "baseline_samples",
        "baseline_factor",
        "baseline_rule",
        "new_normal_s",
        "new_level_s",
        "warmup_s",
        "warmup_factor",
        "baseline_learns_accepted",
        "baseline_in_alarm",
    }
)
# The code that trains and scores, per scorer: a change to any of these files invalidates that
# scorer's entries (the baselines share the autoencoder's data, role and calibration code).
_SHARED = ("data", "role", "pipeline", "bench/scorer")
_SOURCES = {
    "oteo": (*_SHARED, "model", "fit", "export", "noise"),
    "pca": (*_SHARED, "bench/baseline"),
    "random": (*_SHARED, "bench/baseline"),
}


def model_settings(opts: TrainOptions) -> dict[str, Any]:
    """The options that shape a scorer's outputs (everything but the detection settings)."""
    flat = asdict(opts)
    flat.update(flat.pop("model"))
    fit = flat.pop("fit")
    fit.pop("progress", None)
    flat.update(fit)
    return {k: v for k, v in sorted(flat.items()) if k not in DETECTION_SETTINGS}


@functools.cache
def _code_digest(scorer: str) -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _SOURCES.get(scorer, tuple(sorted({n for v in _SOURCES.values() for n in v}))):
        digest.update((root / f"{name}.py").read_bytes())
    return digest.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' shapes and float64 bytes (the data a scorer saw)."""
    digest = hashlib.sha256()
    for a in arrays:
        x = np.ascontiguousarray(a, dtype=np.float64)
        digest.update(repr(x.shape).encode())
        digest.update(x.tobytes())
    return digest.hexdigest()


class CachedFailure(ValueError):
    """The scorer failed on this data when the entry was computed; the message is its error."""


class ScoreCache:
    """Evidence by key under `root` (None: no cache, always computed)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._enabled = root is not None

    def key(self, set_: str, item: str, scorer: str, opts: TrainOptions, data: str) -> str:
        """The entry for one file or channel of a set, one scorer, these settings and data."""
        parts = {
            "cache": CACHE_VERSION,
            "set": set_,
            "item": item,
            "scorer": scorer,
            "settings": model_settings(opts),
            "data": data,
            "code": _code_digest(scorer) if self._enabled else "",
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(
        self,
        set_: str,
        key: str,
        compute: Callable[[], Evidence],
        failures: tuple[type[Exception], ...] = (),
    ) -> Evidence:
        """The cached evidence for `key`, or `compute()` stored under it. A `failures` exception
        (data the scorer cannot learn from) is stored too, and read back as a CachedFailure."""
        if self.root is None:
            return compute()
        path = self.root / set_ / f"{key}.npz"
        failed = path.with_suffix(".failed")
        if failed.is_file():
            raise CachedFailure(failed.read_text())
        if path.is_file():
            try:
                return _load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: unreadable cache entry (%s); scoring again", path, exc)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            found = compute()
        except failures as exc:
            failed.write_text(str(exc))
            raise
        tmp = path.with_name(path.name + ".tmp.npz")
        _save(tmp, found)
        tmp.replace(path)
        return found


def _save(path: Path, e: Evidence) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(e.calibration):
        arrays[f"cal_score_{i}"], arrays[f"cal_channel_{i}"] = s.score, s.channel
        if s.newest is not None:
            arrays[f"cal_newest_{i}"] = s.newest
    out = e.outputs
    arrays.update(
        ends=out.ends,
        stops=out.stops,
        first=out.first,
        score=out.score,
        channel_score=out.channel_score,
    )
    if out.newest is not None:
        arrays["newest"] = out.newest
    meta = {
        "series": len(e.calibration),
        "cross_fitted": e.cross_fitted,
        "period_s": e.period_s,
        "rows": out.rows,
        "notes": e.notes,
        "targets": None if e.targets is None else list(e.targets),
    }
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def _load(path: Path) -> Evidence:
    from training.bench.detection import Evidence

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        calibration = [
            Series(
                z[f"cal_score_{i}"],
                z[f"cal_channel_{i}"],
                z[f"cal_newest_{i}"] if f"cal_newest_{i}" in z.files else None,
            )
            for i in range(meta["series"])
        ]
        newest = z["newest"] if "newest" in z.files else None
        outputs = WindowOutputs(
            meta["rows"], z["ends"], z["stops"], z["first"], z["score"], z["channel_score"], newest
        )
    # No manifest policy: the model file was calibrated with the detection settings of the run
    # that filled the entry, which need not be this run's (that run checked its own).
    targets = meta.get("targets")
    return Evidence(
        list(calibration),
        meta["cross_fitted"],
        meta["period_s"],
        outputs,
        notes=meta["notes"],
        targets=None if targets is None else tuple(targets),
    )
