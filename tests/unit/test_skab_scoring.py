"""SKAB's scoring on tiny synthetic series: each piece of the README's formulas on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.bench.changepoint import (
    PROFILES,
    Profile,
    detections,
    edges,
    normalised,
    pooled,
    score_file,
    scoring_windows,
    window_weight,
)

STANDARD = PROFILES["standard"]
ROWS = 300
EPISODE = (100, 200)  # anomaly rows [100, 200): changepoints where it starts and where it ends


def episode() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1 Hz timestamps, the anomaly label and SKAB-style changepoints (first row of each state)."""
    t = 1.6e9 + np.arange(ROWS, dtype=np.float64)
    anomaly = np.zeros(ROWS, dtype=np.int8)
    anomaly[EPISODE[0] : EPISODE[1]] = 1
    changepoint = np.zeros(ROWS, dtype=np.int8)
    changepoint[list(EPISODE)] = 1
    return t, anomaly, changepoint


def alarm_at(*rows: int) -> np.ndarray:
    """A prediction whose edges fall exactly on `rows` (alternating rise and fall)."""
    p = np.zeros(ROWS, dtype=np.int8)
    for i, row in enumerate(rows):
        p[row:] = 1 - i % 2
    return p


def test_edges_are_both_transitions_at_the_first_row_of_the_new_state() -> None:
    assert edges(np.array([0, 0, 1, 1, 0, 1])).tolist() == [2, 4, 5]


def test_prediction_already_high_on_the_first_row_is_an_edge_there() -> None:
    # The reference scorer takes |diff| of the prediction with its first value kept.
    assert edges(np.array([1, 1, 0])).tolist() == [0, 2]


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_window_weight_runs_from_a_tp_at_the_start_to_a_fp_at_the_end(profile: Profile) -> None:
    assert window_weight(0.0, profile) == pytest.approx(profile.a_tp)
    assert window_weight(1.0, profile) == pytest.approx(profile.a_fp)
    # x near 0 in the middle: tanh(0) = 0 leaves about the midpoint of A_tp and A_fp.
    mid = (profile.a_tp + profile.a_fp) / 2
    assert window_weight(0.5, profile) == pytest.approx(mid, abs=2e-3)


def test_window_weight_follows_the_tanh_at_the_references_1000_steps() -> None:
    # 10 s into a 60 s window: step floor(1000 / 6) = 166 of 0..999 on [-pi/2, pi/2].
    x = -math.pi / 2 + math.pi * 166 / 999
    half = (STANDARD.a_tp - STANDARD.a_fp) / 2
    expected = half * -math.tanh(x) / math.tanh(math.pi / 2) + half + STANDARD.a_fp
    assert window_weight(10 / 60, STANDARD) == pytest.approx(expected, rel=1e-12)


def test_early_detection_in_a_window_scores_more_than_late() -> None:
    t, _, cp = episode()
    early = detections(t, cp, alarm_at(105)).score(STANDARD)
    late = detections(t, cp, alarm_at(150)).score(STANDARD)
    assert early > late


def test_window_reaches_60_s_right_of_the_changepoint_end_included() -> None:
    t, _, cp = episode()
    at_end = detections(t, cp, alarm_at(160))
    after_end = detections(t, cp, alarm_at(161))
    assert at_end.hits[0] == 1.0 and at_end.outside == 0
    assert after_end.hits[0] is None and after_end.outside == 1


def test_window_is_cut_by_time_not_rows() -> None:
    t, _, cp = episode()
    t[120:] += 1.0  # one 2 s step inside the first window: 60 s now span 60 rows
    assert detections(t, cp, alarm_at(125)).hits[0] == pytest.approx(26 / 60)
    late = detections(t, cp, alarm_at(159, 299))  # 60 s after the changepoint: still inside
    assert late.hits[0] == pytest.approx(1.0) and late.outside == 1


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_a_detection_outside_every_window_costs_a_fp(profile: Profile) -> None:
    t, anomaly, cp = episode()
    clean = detections(t, cp, anomaly).score(profile)
    # One more alarm run after the last window adds two edges outside every window.
    extra = anomaly.copy()
    extra[280:290] = 1
    assert detections(t, cp, extra).score(profile) == pytest.approx(clean + 2 * profile.a_fp)


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_a_missed_window_costs_a_fn(profile: Profile) -> None:
    t, _, cp = episode()
    first_only = detections(t, cp, alarm_at(100, 130))  # fall at 130: inside the first window
    assert first_only.hits[1] is None
    assert first_only.score(profile) == pytest.approx(profile.a_tp + profile.a_fn)


def test_only_the_first_detection_in_a_window_counts() -> None:
    t, _, cp = episode()
    once = detections(t, cp, alarm_at(100, 300 - 1))
    flicker = detections(t, cp, alarm_at(100, 110, 120, 300 - 1))
    assert flicker.hits[0] == once.hits[0] and flicker.outside == once.outside


@pytest.mark.parametrize("profile", PROFILES.keys())
def test_a_detector_that_reproduces_the_labels_scores_100(profile: str) -> None:
    t, anomaly, cp = episode()
    perfect = score_file(t, anomaly, cp, anomaly)
    assert pooled([perfect])[f"changepoint_{profile}"] == pytest.approx(100.0)
    assert pooled([perfect])["f1"] == 1.0


@pytest.mark.parametrize("profile", PROFILES.keys())
def test_a_detector_that_never_alarms_scores_0(profile: str) -> None:
    t, anomaly, cp = episode()
    null = score_file(t, anomaly, cp, np.zeros(ROWS, dtype=np.int8))
    assert pooled([null])[f"changepoint_{profile}"] == pytest.approx(0.0)
    assert pooled([null])["missed_changepoints"] == 2


def test_changepoint_score_is_normalised_over_all_files_at_once() -> None:
    t, anomaly, cp = episode()
    hit = detections(t, cp, anomaly)  # both windows at their first row
    miss = detections(t, cp, np.zeros(ROWS, dtype=np.int8))
    # 4 windows, 2 perfect and 2 missed: halfway between null and perfect.
    assert normalised([hit, miss], STANDARD) == pytest.approx(50.0)


def test_pointwise_metrics_pool_counts_over_files() -> None:
    t, anomaly, cp = episode()
    half = anomaly.copy()
    half[150:200] = 0  # 50 of 100 anomalous rows found
    noisy = np.zeros(ROWS, dtype=np.int8)
    noisy[:20] = 1  # 20 of 200 normal rows flagged, nothing found
    m = pooled([score_file(t, anomaly, cp, half), score_file(t, anomaly, cp, noisy)])
    tp, fp, fn = 50, 20, 150
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, 400 - fp)
    assert m["f1"] == pytest.approx(tp / (tp + (fp + fn) / 2))
    assert m["far"] == pytest.approx(100 * fp / 400)
    assert m["mar"] == pytest.approx(100 * fn / 200)


def test_mismatched_lengths_are_refused() -> None:
    t, anomaly, cp = episode()
    with pytest.raises(ValueError, match="same length"):
        detections(t, cp, anomaly[:-1])


def close_changepoints() -> tuple[np.ndarray, np.ndarray]:
    """Changepoints at rows 572 and 573 (1 s apart, as in one SKAB experiment) and at 700."""
    t = 1.6e9 + np.arange(800, dtype=np.float64)
    cp = np.zeros(800, dtype=np.int8)
    cp[[572, 573, 700]] = 1
    return t, cp


def test_windows_closer_than_60_s_are_cut_so_they_never_overlap() -> None:
    t, cp = close_changepoints()
    t0 = t[572]
    assert scoring_windows(t, cp) == [(t0, t0 + 60), (t0 + 60, t0 + 61), (t[700], t[700] + 60)]


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_one_detection_never_hits_two_windows_of_close_changepoints(profile: Profile) -> None:
    t, cp = close_changepoints()
    prediction = np.zeros(800, dtype=np.int8)
    prediction[580:] = 1  # one rising edge 8 s after both changepoints, never falls
    found = detections(t, cp, prediction)
    # From the formulas: the first window [572, 632] s is hit 8 s in; the second, cut to
    # [632, 633] s, holds no detection and is missed; so is the third.
    assert found.hits == [pytest.approx(8 / 60), None, None]
    assert found.outside == 0
    assert found.score(profile) == pytest.approx(window_weight(8 / 60, profile) + 2 * profile.a_fn)
    windows = 3
    expected = (
        100
        * (found.score(profile) - profile.a_fn * windows)
        / ((profile.a_tp - profile.a_fn) * windows)
    )
    assert normalised([found], profile) == pytest.approx(expected)


def test_a_detection_inside_the_cut_window_hits_it_and_on_the_boundary_hits_both() -> None:
    t, cp = close_changepoints()
    prediction = np.zeros(800, dtype=np.int8)
    prediction[632:700] = 1  # rises exactly where the first window ends and the second starts
    found = detections(t, cp, prediction)
    assert found.hits == [1.0, 0.0, 0.0]  # the fall at 700 opens the third window
    assert found.outside == 0
    later = np.zeros(800, dtype=np.int8)
    later[633:650] = 1  # rises 1 s later: the end of the cut window; falls between windows
    found = detections(t, cp, later)
    assert found.hits == [None, 1.0, None] and found.outside == 1
