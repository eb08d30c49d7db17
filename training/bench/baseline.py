"""Baseline window scorers for the benchmark suite: PCA reconstruction error and a random score.

Both are fitted on the same rows, calibrated on the same kind of held-back or cross-fitted normal
windows (`training.bench.scorer.calibration_plan`) and decided by the same shared function as the
product, so the difference in the tables is the window score alone.

PCA: windows are standardised per channel exactly as the trainer does (mean, std with the
trainer's scale floor), flattened to window x channels values, centred, and projected on the
principal components that explain VARIANCE (90 %) of the training windows' variance; the score is
the mean squared reconstruction error of the target channels, as the autoencoder's (at least 1e-12:
a window rebuilt exactly, as in a constant series, must not make a zero threshold). 90 % is a
common rule of thumb (SKAB's published T-squared+Q baseline selects components by explained
variance too, at 85 %); it keeps the large shared movements of the channels and leaves sensor noise
to the residual. Chosen before any result was seen; not tuned. It reads the channels the trainer's
roles give the model (targets and context, training/role.py) and scores the targets, so on
spacecraft data it sees the telemetry channel as the product does, not the one-hot commands.

Random: no information about the data. Independent scores per window would never pass a k-of-n
rule at a 0.999 quantile x margin, so it would only ever show "no alarms"; instead the score is a
stationary log-normal AR(1) process whose correlation time is one window, as overlapping windows
make a real window score. Seeded from the training seed and the file name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.bench.scorer import Fitted, Segments, calibration_plan, held_series
from training.calibrate import Series
from training.data import SensorTable, windows
from training.role import ChannelRoles

if TYPE_CHECKING:
    from training.config import TrainOptions

VARIANCE = 0.9
SCORE_FLOOR = 1e-12


@dataclass
class Scores:
    """A batch of window scores (the daemon's ScoreBatch without reconstruction and code)."""

    score: np.ndarray  # [B] float32
    channel_score: np.ndarray  # [B, C] float32
    newest: np.ndarray | None = None  # [B, C] squared error of each window's newest sample


@dataclass
class PcaModel:
    """Standardise, project on the kept components, score the squared residual."""

    window: int
    roles: ChannelRoles
    mean: np.ndarray  # [inputs]
    scale: np.ndarray  # [inputs]
    center: np.ndarray  # [window * inputs]
    components: np.ndarray  # [k, window * inputs], orthonormal rows

    def run(self, x: np.ndarray) -> Scores:
        """Scores of windows [B, window, C] in raw units (other roles' channel scores 0)."""
        x = x[..., self.roles.inputs]
        z = ((x - self.mean) / self.scale).reshape(len(x), -1).astype(np.float64) - self.center
        residual = z - (z @ self.components.T) @ self.components
        err = np.maximum((residual**2).reshape(x.shape), SCORE_FLOOR)
        err = err[..., list(self.roles.target_positions)]
        channel = np.zeros((len(x), len(self.roles.roles)))
        newest = np.zeros_like(channel)
        channel[:, self.roles.targets], newest[:, self.roles.targets] = err.mean(axis=1), err[:, -1]
        score = err.mean(axis=(1, 2))
        return Scores(score.astype(np.float32), channel.astype(np.float32), newest)


def fit_pca(table: SensorTable, segments: Segments, opts: TrainOptions) -> PcaModel:
    """PCA of the standardised training windows (stride 1, as the trainer's)."""
    from training.pipeline import channel_roles, standardisation

    roles, _ = channel_roles(table, segments, opts)
    mean, scale = standardisation(table, segments, opts.scale_floor, roles)
    mean, scale = mean[roles.inputs], scale[roles.inputs]
    x, _ = windows(table, opts.model.window, 1, segments=segments)
    if len(x) < 2:
        raise ValueError(f"only {len(x)} training windows of {opts.model.window} samples")
    z = ((x[..., roles.inputs] - mean) / scale).reshape(len(x), -1).astype(np.float64)
    center = z.mean(axis=0)
    zc = z - center
    # Eigenvectors of the covariance: the right singular vectors of the centred windows, at the
    # cost of a [D, D] matrix (D = window x channels) rather than an SVD of [N, D].
    var, vectors = np.linalg.eigh(zc.T @ zc)
    var, vectors = np.maximum(var[::-1], 0.0), vectors[:, ::-1].T
    share = np.cumsum(var) / var.sum() if var.sum() > 0 else np.ones(len(var))
    k = min(int(np.searchsorted(share, VARIANCE - 1e-12)) + 1, len(x) - 1, len(var))
    return PcaModel(opts.model.window, roles, mean, scale, center, vectors[: max(k, 1)])


class Pca:
    """PCA reconstruction error of standardised windows (VARIANCE of the variance kept)."""

    name = "pca"

    def fit(self, table: SensorTable, opts: TrainOptions, workdir: Path) -> Fitted:
        plan = calibration_plan(table, opts)
        w, hop = opts.model.window, opts.hop
        outs = []
        for fit_rows, held_rows in plan.folds:
            model = fit_pca(table, fit_rows, opts)
            outs += [model.run(x) for x in held_series(table, held_rows, w, hop)]
        final = model if not plan.cross_fitted else fit_pca(table, plan.final, opts)
        notes = [f"{len(final.components)} principal components"]
        roles = final.roles
        targets = None if roles.every_channel_a_target else tuple(roles.targets)
        return Fitted(
            final, _series(outs), plan.cross_fitted, table.period_s, notes=notes, targets=targets
        )


@dataclass
class RandomModel:
    """A seeded log-normal AR(1) score, one value per window in call order."""

    window: int
    channels: int
    rng: np.random.Generator
    state: float = 0.0

    def run(self, x: np.ndarray) -> Scores:
        """Next len(x) values of the process; the windows' contents are never read."""
        from scipy.signal import lfilter

        phi = float(np.exp(-1.0 / self.window))
        noise = self.rng.standard_normal(len(x)) * np.sqrt(1 - phi**2)
        if not len(x):
            return Scores(np.empty(0, np.float32), np.empty((0, self.channels), np.float32))
        level, _ = lfilter([1.0], [1.0, -phi], noise, zi=[phi * self.state])
        self.state = float(level[-1])
        channel = self.rng.lognormal(size=(len(x), self.channels))
        return Scores(np.exp(level).astype(np.float32), channel.astype(np.float32), channel)


class RandomScore:
    """Random scores with the autocorrelation of a window score; a floor for the alarm policy."""

    name = "random"

    def fit(self, table: SensorTable, opts: TrainOptions, workdir: Path) -> Fitted:
        plan = calibration_plan(table, opts)
        rng = np.random.default_rng((opts.fit.seed, zlib.crc32(opts.name.encode())))
        # Started from the stationary distribution, as if it had always been running.
        start = float(rng.standard_normal())
        model = RandomModel(opts.model.window, len(table.channels), rng, start)
        w, hop = opts.model.window, opts.hop
        outs = [
            model.run(x)
            for _, held_rows in plan.folds
            for x in held_series(table, held_rows, w, hop)
        ]
        return Fitted(model, _series(outs), plan.cross_fitted, table.period_s)


def _series(outs: list[Scores]) -> list[Series]:
    """Calibration series, one per held-back run of windows, as float64."""
    f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    return [Series(f64(o.score), f64(o.channel_score), f64(o.newest)) for o in outs]
