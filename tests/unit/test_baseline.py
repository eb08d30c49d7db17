"""The suite's baseline scorers and the shared stages after a window score, on synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.bench.baseline import Pca, RandomScore, fit_pca
from training.bench.detection import detect, evidence
from training.bench.scorer import calibration_plan, count_windows
from training.config import TrainOptions, options_for
from training.data import from_array


def coupled(rows: int, seed: int = 0) -> np.ndarray:
    """Two channels that move together (one shared sine of period 8), with a little noise."""
    rng = np.random.default_rng(seed)
    base = np.sin(2 * np.pi * np.arange(rows) / 8)
    return np.column_stack([base, 2 * base]) + 0.05 * rng.standard_normal((rows, 2))


def options(name: str = "f", window: int = 16, **kw: object) -> TrainOptions:
    return options_for("default", 2, window=window, progress=False, name=name, **kw)


def test_small_data_are_cross_fitted_in_four_folds_and_large_data_held_back() -> None:
    small = calibration_plan(from_array(coupled(400), 1.0), options())
    assert small.cross_fitted and len(small.folds) == 4 and small.final == [(0, 400)]
    large = calibration_plan(from_array(coupled(3000), 1.0), options())
    assert not large.cross_fitted and large.folds == [([(0, 2400)], [(2400, 3000)])]


def test_count_windows_matches_the_windows_cut() -> None:
    assert count_windows([(0, 20), (30, 35), (40, 56)], 16, 1) == [5, 0, 1]
    assert count_windows([(0, 40)], 16, 4) == [7]  # ends 15, 19, .., 39


def test_pca_keeps_the_components_for_90_percent_of_the_variance() -> None:
    table = from_array(coupled(2000), 1.0)
    model = fit_pca(table, [(0, 2000)], options(window=8))
    # A window of one period of the shared sine is a mix of its sine and cosine: two components;
    # the noise holds about 0.5 % of the variance.
    assert len(model.components) == 2
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(2), atol=1e-9)


def test_pca_scores_a_broken_coupling_far_above_normal_windows() -> None:
    values = coupled(2000)
    table = from_array(values[:1500], 1.0)
    model = fit_pca(table, [(0, 1500)], options(window=8))
    normal = values[1500:1508][None]
    broken = normal.copy()
    broken[0, :, 1] *= -1  # the second channel mirrored: each alone looks normal
    scores = model.run(np.concatenate([normal, broken]).astype(np.float32))
    assert scores.score[1] > 50 * scores.score[0]
    # The window score is the mean of the per-channel scores, as the autoencoder's.
    np.testing.assert_allclose(scores.score, scores.channel_score.mean(axis=1), rtol=1e-5)
    assert scores.channel_score[1, 1] > scores.channel_score[0, 1]


def test_pca_reads_and_scores_the_channels_the_trainers_roles_give_the_model() -> None:
    values = coupled(2000)
    command = (np.arange(2000) % 97 == 0).astype(float)[:, None]  # a rare 0/1 command
    table = from_array(np.hstack([values, command]), 1.0)
    model = fit_pca(table, [(0, 1500)], options(window=8))
    assert model.roles.roles == ("target", "target", "ignore")  # binary: out of the score
    window = np.hstack([values[1500:1508], np.ones((8, 1)) * 5.0])[None]  # unseen command value
    scores = model.run(window.astype(np.float32))
    assert scores.channel_score[0, 2] == 0.0
    np.testing.assert_allclose(scores.score, scores.channel_score[:, :2].mean(axis=1), rtol=1e-5)


def test_random_scores_ignore_the_data_and_repeat_for_a_seed_and_file() -> None:
    table = from_array(coupled(3000), 1.0)
    other = from_array(coupled(3000, seed=5) * 10, 1.0)
    a = RandomScore().fit(table, options("a.csv"), Path("."))
    again = RandomScore().fit(other, options("a.csv"), Path("."))
    b = RandomScore().fit(table, options("b.csv"), Path("."))
    np.testing.assert_array_equal(a.calibration[0].score, again.calibration[0].score)
    assert not np.array_equal(a.calibration[0].score, b.calibration[0].score)
    reseeded = RandomScore().fit(table, options("a.csv", seed=1), Path("."))
    assert not np.array_equal(a.calibration[0].score, reseeded.calibration[0].score)


def test_random_scores_are_correlated_over_about_one_window() -> None:
    fitted = RandomScore().fit(from_array(coupled(3000), 1.0), options(window=16), Path("."))
    x = np.zeros((20_000, 16, 2), dtype=np.float32)
    level = np.log(fitted.model.run(x).score.astype(np.float64))
    lag1 = np.corrcoef(level[:-1], level[1:])[0, 1]
    assert lag1 == pytest.approx(np.exp(-1 / 16), abs=0.02)
    assert np.std(level) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("scorer", [Pca(), RandomScore()], ids=["pca", "random"])
@pytest.mark.parametrize("rows", [400, 3000], ids=["cross-fitted", "held-back"])
def test_every_baseline_gives_calibration_series_the_shared_stages_can_use(
    scorer: Pca | RandomScore, rows: int
) -> None:
    table = from_array(coupled(rows), 1.0)
    opts = options()
    fitted = scorer.fit(table, opts, Path("."))
    plan = calibration_plan(table, opts)
    expected = [n for _, held in plan.folds for n in count_windows(held, 16, 1) if n]
    assert [len(s) for s in fitted.calibration] == expected
    assert fitted.cross_fitted == plan.cross_fitted
    found = detect(evidence(fitted, from_array(coupled(rows + 500, seed=3), 1.0), opts), opts)
    rows_ = found.rows
    assert np.isnan(rows_.score[:15]).all() and np.isfinite(rows_.score[15:]).all()
    assert rows_.channel_score.shape == (rows + 500, 2)
    assert rows_.alarm.dtype == bool and not rows_.alarm[:15].any()
    assert found.policy.enter_threshold >= found.policy.exit_threshold > 0


def test_pca_through_the_shared_stages_alarms_on_a_fault_and_not_before() -> None:
    values = coupled(3500)
    values[3200:3300, 1] += 3.0  # a level shift on one channel
    train = from_array(values[:3000], 1.0)
    opts = options()
    found = detect(evidence(Pca().fit(train, opts, Path(".")), from_array(values, 1.0), opts), opts)
    assert found.rows.alarm[3200:3300].any()
    assert not found.rows.alarm[3000:3200].any()
