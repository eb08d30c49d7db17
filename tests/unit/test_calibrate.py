"""Threshold rules (quantile / peaks over threshold / max) and the event-level target."""

import numpy as np
import pytest

from daemon.detector import Stages
from daemon.manifest import AlarmPolicy, Detection
from training.calibrate import Series, calibrate, events_per_day, quantile_table, threshold


def test_enough_windows_use_the_empirical_quantile():
    scores = np.random.default_rng(0).exponential(1.0, 20_000)
    t = threshold(scores, 0.999)
    assert t.rule == "quantile"
    assert t.value == pytest.approx(np.quantile(scores, 0.999))


def test_fewer_windows_use_a_pareto_tail_fit_close_to_the_true_quantile():
    rng = np.random.default_rng(1)
    scores = rng.exponential(1.0, 2_000)  # 2,000 < 10 / (1 - 0.999)
    t = threshold(scores, 0.999)
    assert t.rule == "pot"
    assert t.parameters["exceedances"] >= 20
    # Exponential tail: the true 0.999 quantile is ln(1000) = 6.9.
    assert 5.0 < t.value < 10.0


def test_too_few_windows_fall_back_to_max_with_a_warning():
    t = threshold(np.array([0.1, 0.2, 0.3, 0.25, 0.15]), 0.999)
    assert t.rule == "max"
    assert t.value == pytest.approx(0.3 * 1.5)
    assert "too few" in t.warnings[0]


def test_heavy_tail_fit_is_capped_with_a_warning():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.exponential(0.01, 1900), rng.pareto(0.7, 100) * 0.1 + 0.05])
    t = threshold(scores, 0.999)
    assert t.value <= scores.max() * 1.5 + 1e-12
    if t.rule == "pot" and t.parameters.get("capped"):
        assert "capped" in t.warnings[0]


def test_quantile_table_is_monotone():
    q = quantile_table(np.random.default_rng(3).gamma(2.0, 1.0, 3000))
    assert all(b >= a for a, b in zip(q.values, q.values[1:], strict=False))
    assert q.p_value(q.values[0]) == pytest.approx(1 - q.levels[0])
    assert q.p_value(1e9) == pytest.approx(1 - q.levels[-1])


def test_event_target_raises_the_threshold_until_replay_meets_it():
    rng = np.random.default_rng(4)
    scores = [rng.exponential(0.1, 3600) for _ in range(6)]  # 6 hours at 1 Hz
    for s in scores:  # bursts of high scores: normal but rare operating transients
        for start in rng.integers(0, 3500, 4):
            s[start : start + 20] += 1.0
    series = [Series(s, s[:, None]) for s in scores]
    base = AlarmPolicy(enter_threshold=1, exit_threshold=1)
    plain = Detection.legacy()
    loose, _, cal_loose = calibrate(
        series, base, plain, 1.0, q=0.99, exit_q=0.95, target_per_day=None, cross_fitted=False
    )
    tight, _, cal_tight = calibrate(
        series, base, plain, 1.0, q=0.99, exit_q=0.95, target_per_day=4.0, cross_fitted=False
    )
    assert cal_loose.false_alarms_per_day > 4.0
    assert cal_tight.false_alarms_per_day <= 4.0
    assert tight.enter_threshold > loose.enter_threshold
    rate = events_per_day(series, Stages(plain, 1.0, "m"), tight)[0]
    assert rate == pytest.approx(cal_tight.false_alarms_per_day)
    assert any("raised" in w for w in cal_tight.warnings)


def test_the_false_alarm_target_is_met_by_a_stream_already_warmed_up():
    """The warm-up would hide the held-back series' early alarms: calibration replays without it,
    and the stages it returns keep it."""
    rng = np.random.default_rng(5)
    s = rng.exponential(0.1, 3600)
    for start in (100, 200, 2000):  # two transients inside a 300 s warm-up, one after it
        s[start : start + 20] += 1.0
    series = [Series(s, s[:, None])]
    base = AlarmPolicy(enter_threshold=1, exit_threshold=1)
    found = {}
    for warmup_s in (None, 300.0):
        d = Detection(warmup_s=warmup_s)
        found[warmup_s] = calibrate(
            series, base, d, 1.0, q=0.99, exit_q=0.95, target_per_day=4.0, cross_fitted=False
        )
    (plain, _, cal_plain), (warm, stages, cal_warm) = found[None], found[300.0]
    assert warm == plain and cal_warm.false_alarms_per_day == cal_plain.false_alarms_per_day
    assert stages.warmup_s == 300.0
