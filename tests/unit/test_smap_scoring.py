"""telemanom's event rule on tiny synthetic sequences: each clause of the protocol on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.bench.smap_scoring import (
    EventCounts,
    pooled,
    read_labels,
    read_published,
    rescore_published,
    score_channel,
    spans,
)


def test_spans_are_inclusive_first_and_last_rows_of_each_run() -> None:
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    assert spans(mask) == [(0, 1), (4, 4), (6, 8)]
    assert spans(np.zeros(5, dtype=bool)) == []


def test_a_prediction_overlapping_a_labelled_sequence_is_a_true_positive() -> None:
    assert score_channel([(90, 100)], [(100, 200)]) == EventCounts(tp=1, fp=0, fn=0)


def test_touching_is_overlap_because_both_ends_are_included() -> None:
    assert score_channel([(200, 210)], [(100, 200)]).tp == 1
    assert score_channel([(201, 210)], [(100, 200)]) == EventCounts(tp=0, fp=1, fn=1)


def test_each_labelled_sequence_counts_once_however_many_predictions_hit_it() -> None:
    counts = score_channel([(100, 110), (120, 130), (150, 160)], [(100, 200)])
    assert counts == EventCounts(tp=1, fp=0, fn=0)


def test_a_prediction_overlapping_nothing_is_a_false_positive() -> None:
    counts = score_channel([(10, 20), (30, 40), (150, 160)], [(100, 200)])
    assert counts == EventCounts(tp=1, fp=2, fn=0)


def test_an_unmatched_labelled_sequence_is_a_false_negative() -> None:
    counts = score_channel([(150, 160)], [(100, 200), (500, 600), (700, 701)])
    assert counts == EventCounts(tp=1, fp=0, fn=2)


def test_a_prediction_spanning_two_labelled_sequences_makes_both_true_positives() -> None:
    assert score_channel([(150, 550)], [(100, 200), (500, 600)]) == EventCounts(tp=2)


def test_no_predictions_gives_all_false_negatives_and_zero_precision() -> None:
    counts = score_channel([], [(1, 2), (5, 6)])
    assert counts == EventCounts(tp=0, fp=0, fn=2)
    assert counts.precision == 0.0 and counts.recall == 0.0 and counts.f_beta(0.5) == 0.0


def test_reversed_sequences_are_refused() -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        score_channel([(10, 5)], [])


def test_f_beta_weighs_precision_by_beta() -> None:
    c = EventCounts(tp=6, fp=2, fn=6)  # precision 0.75, recall 0.5
    p, r = 0.75, 0.5
    assert c.f_beta(1.0) == pytest.approx(2 * p * r / (p + r))
    assert c.f_beta(0.5) == pytest.approx(1.25 * p * r / (0.25 * p + r))
    assert c.f_beta(0.5) > c.f_beta(1.0)  # precision is the better of the two here


def test_counts_are_pooled_per_spacecraft_before_the_ratios() -> None:
    counts = {"A-1": EventCounts(3, 1, 0), "A-2": EventCounts(0, 0, 2), "P-1": EventCounts(1, 3, 1)}
    table = pooled(counts, {"A-1": "MSL", "A-2": "MSL", "P-1": "SMAP"})
    assert table["MSL"]["tp"] == 3 and table["MSL"]["fn"] == 2 and table["MSL"]["channels"] == 2
    assert table["MSL"]["precision"] == pytest.approx(3 / 4)
    assert table["all"]["precision"] == pytest.approx(4 / 8)  # pooled counts, not mean ratios
    assert table["all"]["recall"] == pytest.approx(4 / 7)
    assert table["SMAP"]["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)


def test_label_and_published_files_are_read_with_the_first_row_of_a_repeated_channel(
    tmp_path: Path,
) -> None:
    labels = tmp_path / "labeled_anomalies.csv"
    labels.write_text(
        "chan_id,spacecraft,anomaly_sequences,class,num_values\n"
        'P-1,SMAP,"[[10, 20], [50, 60]]","[point, point]",100\n'
        'P-2,SMAP,"[[30, 40]]",[point],100\n'
        'P-2,SMAP,"[[31, 45]]",[point],100\n'
        'M-1,MSL,"[[5, 8]]",[point],90\n'
    )
    published = tmp_path / "published.csv"
    published.write_text(
        "chan_id,false_positives,false_negatives,true_positives,fp_sequences,tp_sequences\n"
        'P-1,1,1,1,"[[70, 80]]","[(15, 25)]"\n'
        'P-2,0,0,1,[],"[(35, 36)]"\n'
        'P-2,0,0,1,[],"[(35, 36)]"\n'
    )
    chans = read_labels(labels)
    assert [c.chan_id for c in chans] == ["P-1", "P-2", "M-1"]
    assert chans[1].sequences == ((30, 40),) and chans[0].rows == 100
    pub = read_published(published)
    assert pub[0].predicted == ((15, 25), (70, 80))
    ours = rescore_published(chans, pub)
    # M-1 has no published predictions: its sequence is missed.
    assert ours == {
        "P-1": EventCounts(1, 1, 1),
        "P-2": EventCounts(1, 0, 0),
        "M-1": EventCounts(0, 0, 1),
    }
    assert all(ours[p.chan_id] == p.counts for p in pub)


def test_a_malformed_sequence_names_the_file_line_and_column(tmp_path: Path) -> None:
    labels = tmp_path / "labeled_anomalies.csv"
    labels.write_text("chan_id,spacecraft,anomaly_sequences\nP-1,SMAP,[[1, 2], oops]\n")
    with pytest.raises(ValueError, match=r"labeled_anomalies.csv line 2 \(P-1\): anomaly_seq"):
        read_labels(labels)
