"""`oteo evaluate`'s numbers on synthetic decisions: rows without a reading, and a model in alarm
most of the time, are reported truthfully."""

from __future__ import annotations

import numpy as np

from training.evaluate import Evaluation, metrics

ROWS = 300


def episode_with_filled_rows() -> tuple[np.ndarray, np.ndarray]:
    """Label 1 on rows 100..199 (joined across the filled rows 120, 140, 160, as the loader
    leaves them) and the filled-row mask."""
    label = np.zeros(ROWS, dtype=bool)
    label[100:200] = True
    filled = np.zeros(ROWS, dtype=bool)
    filled[[120, 140, 160]] = True
    return label, filled


def test_filled_rows_are_left_out_of_the_pointwise_counts() -> None:
    label, filled = episode_with_filled_rows()
    alarm = np.zeros(ROWS, dtype=bool)
    alarm[110:250] = True
    m = metrics(alarm, label, 1.0, filled=filled)
    assert (m["tp"], m["fn"]) == (90 - 3, 10)  # rows 110..199 less the 3 filled ones
    assert (m["fp"], m["tn"]) == (50, 150)
    assert m["filled_rows"] == 3
    assert m["true_events"] == 1 and m["detected_events"] == 1


def test_a_model_in_alarm_most_of_the_time_says_so_first() -> None:
    label, filled = episode_with_filled_rows()
    alarm = np.ones(ROWS, dtype=bool)
    alarm[:9] = False  # in alarm on 97 % of the rows
    m = metrics(alarm, label, 1.0, filled=filled)
    assert m["alarm_share"] == (ROWS - 9 - 3) / (ROWS - 3)
    text = Evaluation(np.zeros(ROWS), alarm, label, m).summary()
    assert text.startswith("WARNING: in alarm 97 % of rows")
    # One alarm run over everything counts as the episode's detection (event precision 1.00):
    # which is why the summary must lead with the warning.
    assert m["true_events"] == 1 and m["event_precision"] == 1.0
    assert m["far"] > 90


def test_a_quiet_model_gets_no_warning() -> None:
    label, filled = episode_with_filled_rows()
    m = metrics(label.copy(), label, 1.0, filled=filled)
    assert m["alarm_share"] < 0.5
    assert not Evaluation(np.zeros(ROWS), label, label, m).summary().startswith("WARNING")
