"""The alarm state machine shared by the daemon, `oteo evaluate` and calibration."""

import numpy as np
import pytest

from daemon.alarm import AlarmTracker, Transition, count_events, replay
from daemon.manifest import AlarmPolicy


def policy(**kw: float) -> AlarmPolicy:
    base = dict(enter_threshold=1.0, exit_threshold=0.5, k=3, n=5, clear_windows=2)
    base.update(kw)
    return AlarmPolicy(**base)


def transitions(p: AlarmPolicy, scores: list[float]) -> list[tuple[int, Transition]]:
    tracker = AlarmTracker(p)
    steps = [tracker.update(s) for s in scores]
    return [(i, s.transition) for i, s in enumerate(steps) if s.transition is not None]


def test_k_of_n_exceedances_start_an_alarm_on_the_kth():
    assert transitions(policy(), [2, 0, 2, 0, 2]) == [(4, Transition.START)]


def test_fewer_than_k_exceedances_in_n_windows_never_alarm():
    assert transitions(policy(), [2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2]) == []


def test_hysteresis_keeps_alarm_between_exit_and_enter_thresholds():
    scores = [2, 2, 2, 0.8, 0.8, 0.8, 0.4, 0.4]
    assert transitions(policy(), scores) == [(2, Transition.START), (7, Transition.END)]


def test_one_window_below_exit_does_not_end_alarm_when_clear_windows_is_two():
    scores = [2, 2, 2, 0.4, 2, 0.4, 0.4]
    assert transitions(policy(), scores) == [(2, Transition.START), (6, Transition.END)]


def test_cooldown_suppresses_a_new_alarm_right_after_the_end():
    scores = [2, 2, 2, 0, 0] + [2] * 6
    without = transitions(policy(cooldown_windows=0), scores)
    with_cooldown = transitions(policy(cooldown_windows=4), scores)
    assert without[2] == (7, Transition.START)
    assert with_cooldown[2][0] > 7


def test_smoothing_delays_and_damps_a_single_spike():
    spike = [0.1] * 5 + [5.0] + [0.1] * 5
    assert transitions(policy(k=1, n=1, smoothing_alpha=1.0), spike)[0] == (5, Transition.START)
    assert transitions(policy(k=1, n=1, smoothing_alpha=0.1), spike) == []


def test_sensitivity_scales_both_thresholds():
    tracker = AlarmTracker(policy(k=1, n=1, clear_windows=1), sensitivity=2.0)
    assert tracker.update(0.6).transition is Transition.START  # 0.6 >= 1.0 / 2
    assert tracker.update(0.3).active  # 0.3 >= 0.5 / 2: still on
    assert tracker.update(0.2).transition is Transition.END


def test_replay_equals_tracker_and_nan_resets_the_state():
    rng = np.random.default_rng(0)
    scores = rng.exponential(0.6, size=400)
    p = policy()
    tracker = AlarmTracker(p)
    live = np.array([tracker.update(s).active for s in scores])
    assert np.array_equal(replay(scores, p), live)
    with_gap = np.concatenate([[2.0, 2.0], [np.nan], [2.0]])
    assert not replay(with_gap, p).any()  # two exceedances, a gap, one more: never 3 of 5


def test_count_events_counts_rising_edges():
    assert count_events(np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)) == 3
    assert count_events(np.array([], dtype=bool)) == 0


def test_policy_rejects_exit_above_enter_and_k_above_n():
    with pytest.raises(ValueError, match="exit_threshold"):
        policy(exit_threshold=2.0)
    with pytest.raises(ValueError, match="k"):
        policy(k=6)
