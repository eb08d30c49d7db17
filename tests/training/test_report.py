"""The training report and the evaluation score plot: files written, readable, fast enough."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from daemon.manifest import (
    AlarmPolicy,
    Calibration,
    Manifest,
    Provenance,
    Validation,
)
from daemon.quantiles import ChannelQuantiles, Quantiles
from training.report import FIGURES, bucket_max, plot_scores, write_report

T0 = 1_583_748_873.0  # 2020-03-09 10:14:33 UTC
CHANNELS = ["pressure", "temperature", "current", "voltage", "flow", "vibration"]


def manifest(*, hashable: bool = False, cross_fitted: bool = False) -> Manifest:
    c = len(CHANNELS)
    return Manifest(
        name="pump-7",
        version="3",
        created="2024-01-01T00:00:00.000000Z",
        channels=CHANNELS,
        channel_mean=[0.0] * c,
        channel_scale=[1.0, 2.0, 0.5, 10.0, 1.0, 0.1],
        window=32,
        sample_period_s=1.0,
        architecture="conv1d",
        variant="denoising",
        noise="gaussian",
        noise_level=0.1,
        code_size=8,
        hashable=hashable,
        calibration=Calibration(
            rule="pot",
            quantile=0.999,
            exit_quantile=0.99,
            windows=2000,
            cross_fitted=cross_fitted,
            parameters={"u": 0.5, "shape": 0.1, "scale": 0.2},
            target_false_alarms_per_day=1.0,
            false_alarms_per_day=0.5,
            heldback_hours=12.0,
            warnings=["held-back data cover only 12 h"],
        ),
        alarm=AlarmPolicy(enter_threshold=2.0, exit_threshold=1.2),
        score_quantiles=Quantiles(levels=[0.5, 0.99], values=[0.2, 1.0]),
        channel_score_quantiles=ChannelQuantiles(levels=[0.5, 0.9], values=[[0.1, 0.5]] * c),
        provenance=Provenance(
            data_fingerprint="ab" * 32,
            source="pump.csv",
            rows=10_000,
            train_windows=7_000,
            seed=0,
            epochs=12,
            train_seconds=4.2,
            oteo_version="0.1.0",
        ),
        validation=Validation(
            train_loss=0.05,
            heldback_loss=0.06,
            parity_max_rel_error=3e-7,
            code_binariness=0.87 if hashable else None,
        ),
    )


def train_result(**kwargs: bool) -> SimpleNamespace:
    """What `training.pipeline.train` returns, without training anything."""
    rng = np.random.default_rng(0)
    m = manifest(**kwargs)
    n, k, w, c = 2000, m.code_size, m.window, len(m.channels)
    train_loss = 1.0 / np.arange(1, 13)
    phase = np.linspace(0, 2 * np.pi, w)[None, :, None] + rng.uniform(0, 6, (4, 1, c))
    windows = (np.sin(phase) * np.asarray(m.channel_scale)).astype(np.float32)
    codes = rng.uniform(size=(n, k)) ** 4 if m.hashable else rng.normal(size=(n, k))
    return SimpleNamespace(
        path=Path("pump-7.onnx"),
        manifest=m,
        fit=SimpleNamespace(
            epochs=12,
            best_epoch=8,
            history={"train": list(train_loss), "heldback": list(train_loss * 1.2)},
        ),
        heldback_scores=rng.lognormal(-1.5, 1.2, n),  # spans several decades: log axis
        sample_windows=windows,
        sample_reconstructions=windows + rng.normal(0, 0.1, windows.shape).astype(np.float32),
        codes=codes.astype(np.float32),
        seconds=5.0,
        notes=["near-constant channels (kept, floor on scale): ['<flow>']"],
    )


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


# A report takes a few seconds to draw: each kind is written once for the module.
@pytest.fixture(scope="module")
def plain_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(train_result(), tmp_path_factory.mktemp("plain") / "report")


@pytest.fixture(scope="module")
def hashing_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(train_result(hashable=True), tmp_path_factory.mktemp("hashing"))


def test_write_report_writes_page_and_four_figures(plain_page: Path) -> None:
    page = plain_page
    assert page.name == "index.html" and page.parent.name == "report"
    for name in FIGURES:
        path = page.parent / name
        width, height = png_size(path)
        assert width >= 500 and height >= 300
        assert path.stat().st_size > 10_000, f"{name} looks empty"
    text = page.read_text()
    assert "pump-7" in text
    for name in FIGURES:
        assert f'src="{name}"' in text


def test_page_lists_key_facts_and_escapes_notes(plain_page: Path) -> None:
    text = plain_page.read_text()
    for fact in ("conv1d / denoising", "32 × 6", "10,000", "enter 2 / exit 1.2", "pot at q=0.999"):
        assert fact in text
    assert "0.5 estimated over 12.0 h" in text
    assert "3.0e-07" in text
    assert "held-back data cover only 12 h" in text
    assert "&lt;flow&gt;" in text and "<flow>" not in text
    assert "code binariness" not in text


def test_hashing_model_adds_code_histogram(plain_page: Path, hashing_page: Path) -> None:
    width_plain, _ = png_size(plain_page.parent / "codes.png")
    width_hash, _ = png_size(hashing_page.parent / "codes.png")
    assert width_hash > 1.5 * width_plain  # a second panel beside the projection
    text = hashing_page.read_text()
    assert "code binariness" in text
    assert "87.0% of code units" in text


def test_cross_fitted_scores_not_aligned_with_codes_still_plot(tmp_path: Path) -> None:
    result = train_result(cross_fitted=True)
    result.heldback_scores = result.heldback_scores[:777]
    page = write_report(result, tmp_path)
    for name in FIGURES:
        png_size(page.parent / name)
    assert "cross-fitted" in page.read_text()


def test_plot_scores_draws_nan_gaps(tmp_path: Path) -> None:
    n = 5000
    t = T0 + np.arange(n, dtype=np.float64)
    t[3000:] += 3600  # an hour without data
    score = np.abs(np.random.default_rng(1).normal(0.5, 0.3, n))
    score[:31] = np.nan  # the first window is not complete yet
    score[1000:1100] = np.nan
    label = np.zeros(n, bool)
    label[2000:2200] = True
    alarm = np.zeros(n, bool)
    alarm[2010:2150] = True
    path = tmp_path / "score.png"
    plot_scores(path, t, score, alarm, label, AlarmPolicy(enter_threshold=2, exit_threshold=1))
    width, height = png_size(path)
    assert (width, height) == (1200, 450)
    assert path.stat().st_size > 20_000


def test_plot_scores_200k_points_quickly(tmp_path: Path) -> None:
    n = 200_000
    rng = np.random.default_rng(2)
    score = rng.lognormal(-2, 0.5, n)
    label = np.zeros(n, bool)
    label[150_000:151_000] = True
    alarm = score > 0.5
    path = tmp_path / "score.png"
    policy = AlarmPolicy(enter_threshold=1, exit_threshold=0.5)
    start = time.perf_counter()
    plot_scores(path, T0 + np.arange(n), score, alarm, label, policy)
    assert time.perf_counter() - start < 10
    png_size(path)
    assert path.stat().st_size > 20_000


def test_downsampling_keeps_a_one_sample_spike() -> None:
    n = 1_000_000
    t = T0 + np.arange(n, dtype=np.float64)
    y = np.full((n, 1), 0.1)
    y[654_321] = 50.0
    y[:100] = np.nan
    left, right, peak = bucket_max(t, y, buckets=1000)
    assert 900 <= len(left) <= 1000
    assert np.nanmax(peak) == 50.0
    assert np.all(right > left)
    assert not np.isnan(peak[0, 0])  # a bucket with some scores is not a gap
