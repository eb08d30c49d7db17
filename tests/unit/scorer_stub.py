"""A stand-in for a model file in engine tests: no torch, no ONNX, a hand-made manifest.

`StubScorer` "reconstructs" every window as the training mean, so its score is the mean squared
standardised deviation from normal: about 1 on normal data, large for a fault, per channel in
`channel_score`. It has the `daemon.model.Scorer` shape the engine needs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from daemon.manifest import (
    AlarmPolicy,
    Calibration,
    Detection,
    Manifest,
    Provenance,
    Validation,
)
from daemon.model import ScoreBatch
from daemon.quantiles import ChannelQuantiles, Quantiles

CODE_SIZE = 4


def make_manifest(
    channels: list[str],
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    window: int = 16,
    hop: int = 1,
    period_s: float = 1.0,
    enter: float = 4.0,
    exit_: float = 3.0,
    name: str = "stub",
    detection: Detection | None = None,
) -> Manifest:
    """A valid manifest for a stub model of these channels."""
    n = len(channels)
    return Manifest(
        name=name,
        version="1",
        created="2026-01-01T00:00:00Z",
        channels=channels,
        channel_mean=[float(v) for v in mean],
        channel_scale=[float(v) for v in scale],
        window=window,
        sample_period_s=period_s,
        architecture="dense",
        variant="basic",
        code_size=CODE_SIZE,
        hashable=False,
        calibration=Calibration(
            rule="quantile",
            quantile=0.999,
            exit_quantile=0.99,
            windows=1000,
            cross_fitted=False,
            false_alarms_per_day=0.0,
            heldback_hours=1.0,
        ),
        alarm=AlarmPolicy(hop=hop, enter_threshold=enter, exit_threshold=exit_),
        score_quantiles=Quantiles(levels=[0.5, 0.99], values=[1.0, 2.0]),
        channel_score_quantiles=ChannelQuantiles(levels=[0.5, 0.99], values=[[1.0, 2.0]] * n),
        provenance=Provenance(
            data_fingerprint="0" * 64,
            rows=0,
            train_windows=0,
            seed=0,
            epochs=0,
            train_seconds=0.0,
            oteo_version="test",
        ),
        validation=Validation(train_loss=1.0, heldback_loss=1.0, parity_max_rel_error=0.0),
        detection=detection,
    )


class StubScorer:
    """Scores windows by their standardised deviation from the manifest's mean."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.sha256 = hashlib.sha256(manifest.to_json().encode()).hexdigest()
        self.window = manifest.window
        self.channels = len(manifest.channels)
        self._mean = np.asarray(manifest.channel_mean, dtype=np.float32)
        self._scale = np.asarray(manifest.channel_scale, dtype=np.float32)
        self.runs = 0
        self.windows_scored = 0

    def run(self, windows: np.ndarray) -> ScoreBatch:
        if windows.shape[1:] != (self.window, self.channels):
            raise ValueError(f"stub {self.manifest.name}: windows of shape {windows.shape}")
        self.runs += 1
        self.windows_scored += len(windows)
        z = (windows - self._mean) / self._scale
        channel_score = (z**2).mean(axis=1)
        reconstruction = np.broadcast_to(self._mean, windows.shape).copy()
        code = np.zeros((len(windows), CODE_SIZE), dtype=np.float32)
        return ScoreBatch(channel_score.mean(axis=1), channel_score, reconstruction, code)


def stub_for(rows: np.ndarray, channels: list[str] | None = None, **kw: object) -> StubScorer:
    """A stub whose normal is `rows` [T, C] (mean and std per channel)."""
    names = channels or [f"c{i}" for i in range(rows.shape[1])]
    return StubScorer(make_manifest(names, rows.mean(0), rows.std(0) + 1e-6, **kw))  # type: ignore[arg-type]
