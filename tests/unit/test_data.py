"""Loading sensor recordings onto a regular grid: timestamps, channels, gaps, labels, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DataError,
    fingerprint,
    from_array,
    load_table,
    normal_segments,
    split_heldback,
    windows,
)

T0 = 1_583_748_873.0  # 2020-03-09 10:14:33 UTC, the first row of a SKAB file


def write_csv(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> Path:
    lines = [sep.join(header)] + [sep.join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def iso(t: float) -> str:
    return np.datetime64(int(t * 1000), "ms").astype(str)


def test_iso_timestamps_detected_and_period_inferred(tmp_path: Path) -> None:
    rows = [[iso(T0 + i) + "Z", i, 2 * i] for i in range(20)]
    table = load_table(write_csv(tmp_path / "a.csv", ["Timestamp", "a", "b"], rows))
    assert table.channels == ["a", "b"]
    assert table.period_s == 1.0
    assert table.timestamps[0] == T0
    assert table.segments == [(0, 20)]
    np.testing.assert_array_equal(table.values[:, 1], 2 * np.arange(20))
    assert table.values.dtype == np.float32
    assert table.source == "a.csv"


def test_unix_seconds_column_detected_by_values(tmp_path: Path) -> None:
    rows = [[i * 0.5, T0 + i * 0.1] for i in range(30)]
    table = load_table(write_csv(tmp_path / "u.csv", ["pressure", "clock"], rows))
    assert table.channels == ["pressure"]
    assert table.period_s == pytest.approx(0.1)
    assert table.timestamps[0] == pytest.approx(T0)


def test_unix_milliseconds_detected_by_magnitude(tmp_path: Path) -> None:
    rows = [[int(T0 * 1000) + 10 * i, i] for i in range(30)]
    table = load_table(write_csv(tmp_path / "ms.csv", ["ts", "v"], rows))
    assert table.period_s == pytest.approx(0.01)
    assert table.timestamps[0] == pytest.approx(T0)


def test_skab_semicolon_file_with_labels(tmp_path: Path) -> None:
    header = ["datetime", "Accelerometer1RMS", "Current", "anomaly", "changepoint"]
    rows = [
        [iso(T0 + i).replace("T", " ")[:19], 0.02 + 0.001 * i, 1.5, int(10 <= i < 13), int(i == 10)]
        for i in range(30)
    ]
    table = load_table(write_csv(tmp_path / "skab.csv", header, rows, sep=";"))
    assert table.channels == ["Accelerometer1RMS", "Current"]
    assert set(table.labels) == {"anomaly", "changepoint"}
    assert table.labels["anomaly"].dtype == np.int8
    np.testing.assert_array_equal(np.flatnonzero(table.anomalous), [10, 11, 12])
    assert table.labels["changepoint"].sum() == 1


def test_label_columns_never_become_channels(tmp_path: Path) -> None:
    rows = [[T0 + i, i, 0, 0] for i in range(10)]
    path = write_csv(tmp_path / "l.csv", ["time", "v", "anomaly", "changepoint"], rows)
    assert load_table(path).channels == ["v"]
    with pytest.raises(DataError, match="label"):
        load_table(path, channels=["v", "anomaly"])


def test_channel_selection_and_unknown_channel(tmp_path: Path) -> None:
    rows = [[T0 + i, i, -i, 3 * i] for i in range(10)]
    path = write_csv(tmp_path / "c.csv", ["time", "a", "b", "c"], rows)
    table = load_table(path, channels=["c", "a"])
    assert table.channels == ["c", "a"]
    np.testing.assert_array_equal(table.values[:, 0], 3 * np.arange(10))
    with pytest.raises(DataError, match=r"nope.*available: a, b, c"):
        load_table(path, channels=["a", "nope"])


def test_non_numeric_column_ignored_with_note(tmp_path: Path) -> None:
    rows = [[T0 + i, i, "on"] for i in range(10)]
    table = load_table(write_csv(tmp_path / "n.csv", ["time", "v", "mode"], rows))
    assert table.channels == ["v"]
    assert any("mode" in n for n in table.notes)


def test_rows_sorted_and_the_first_reading_in_a_slot_wins(tmp_path: Path) -> None:
    """As in the daemon, where a second reading in a filled slot is a duplicate."""
    rows = [[T0 + i, float(i)] for i in range(10)]
    rows = [*rows[::-1], [T0 + 4, 99.0]]
    table = load_table(write_csv(tmp_path / "d.csv", ["time", "v"], rows))
    np.testing.assert_array_equal(table.values[:, 0], np.arange(10))
    assert any("first value" in n for n in table.notes)


def test_short_gap_filled_by_interpolation(tmp_path: Path) -> None:
    rows = [[T0 + i, 10.0 * i] for i in range(20) if i not in (7, 8)]
    rows[3][1] = None  # one empty cell too
    table = load_table(write_csv(tmp_path / "g.csv", ["time", "v"], rows))
    assert table.segments == [(0, 20)]
    np.testing.assert_allclose(table.values[:, 0], 10.0 * np.arange(20))
    assert any("interpolation" in n for n in table.notes)


def test_long_gap_splits_segments_and_no_window_spans_it(tmp_path: Path) -> None:
    rows = [[T0 + i, float(i)] for i in list(range(20)) + list(range(40, 60))]
    table = load_table(write_csv(tmp_path / "G.csv", ["time", "v"], rows), max_gap_s=5)
    assert table.segments == [(0, 20), (40, 60)]
    assert np.isnan(table.values[20:40]).all()  # never zero-filled
    x, end_rows = windows(table, 8, hop=2)
    starts = end_rows - 7
    assert ((end_rows < 20) | (starts >= 40)).all()
    assert end_rows.max() == 59 and starts.min() == 0
    np.testing.assert_array_equal(end_rows[:3], [7, 9, 11])
    assert not np.isnan(x).any()
    np.testing.assert_array_equal(x[:, -1, 0], table.values[end_rows, 0])


def test_irregular_timestamps_binned_onto_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 100, 400))
    rows = [[T0 + t, t] for t in times]
    table = load_table(write_csv(tmp_path / "i.csv", ["time", "v"], rows), period_s=1.0)
    assert table.period_s == 1.0
    np.testing.assert_allclose(np.diff(table.timestamps), 1.0)
    # v equals the time offset, so each bin's mean is close to its grid time.
    offset = table.timestamps - T0
    assert np.nanmax(np.abs(table.values[:, 0] - offset)) < 0.6
    assert any("irregular" in n for n in table.notes)


def test_a_slower_channel_holds_its_last_value(tmp_path: Path) -> None:
    """Sample-and-hold, as the daemon's channel aligner does (not interpolation: the daemon
    cannot wait for the slow channel's next sample)."""
    rows = [[T0 + i, float(i), float(i) if i % 3 == 0 else None] for i in range(31)]
    table = load_table(write_csv(tmp_path / "m.csv", ["time", "fast", "slow"], rows))
    assert table.period_s == 1.0
    assert table.segments == [(0, 31)]
    np.testing.assert_allclose(table.values[:, 0], np.arange(31))
    np.testing.assert_allclose(table.values[:, 1], 3 * (np.arange(31) // 3))


def test_multi_rate_channels_on_own_timestamps_binned(tmp_path: Path) -> None:
    fast = [[T0 + 0.1 * i, float(i), None] for i in range(60)]
    slow = [[T0 + 0.3 * i + 0.01, None, 5.0 + i] for i in range(20)]
    rows = sorted(fast + slow, key=lambda r: r[0])
    table = load_table(write_csv(tmp_path / "r.csv", ["time", "fast", "slow"], rows), period_s=0.1)
    assert not np.isnan(table.values[table.segments[0][0] : table.segments[0][1]]).any()
    np.testing.assert_allclose(table.values[:60, 0], np.arange(60))


def test_constant_channel_reported(tmp_path: Path) -> None:
    rows = [[T0 + i, float(i % 5), 230.0] for i in range(30)]
    table = load_table(write_csv(tmp_path / "k.csv", ["time", "v", "mains"], rows))
    assert table.constant_channels == ["mains"]
    assert table.channels == ["v", "mains"]
    assert any("mains" in n for n in table.notes)


def test_anomalous_rows_excluded_from_training() -> None:
    labels = np.zeros(50)
    labels[20:25] = 1
    table = from_array(np.arange(50.0), 1.0, labels={"anomaly": labels})
    assert normal_segments(table) == [(0, 20), (25, 50)]
    _, end_rows = windows(table, 6, exclude=table.anomalous)
    starts = end_rows - 5
    assert not ((starts <= 24) & (end_rows >= 20)).any()
    assert 19 in end_rows and 30 in end_rows


def test_split_heldback_takes_time_ordered_tail() -> None:
    values = np.arange(100.0)
    values[40:50] = np.nan  # long gap: two segments
    labels = np.zeros(100)
    labels[90:95] = 1
    table = from_array(values, 1.0, labels={"anomaly": labels})
    train, held = split_heldback(table, 0.25)
    train_rows = np.concatenate([np.arange(s, e) for s, e in train])
    held_rows = np.concatenate([np.arange(s, e) for s, e in held])
    normal_rows = len(train_rows) + len(held_rows)
    assert normal_rows == 100 - 10 - 5
    assert len(held_rows) == round(0.25 * normal_rows)
    assert train_rows.max() < held_rows.min()
    assert not table.anomalous[held_rows].any()
    assert held == [(74, 90), (95, 100)]
    _, held_min = split_heldback(table, 0.0, min_rows=30)
    assert sum(e - s for s, e in held_min) == 30


def test_csv_without_timestamps_needs_period(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "v.csv", ["a", "b"], [[i, -i] for i in range(10)])
    with pytest.raises(DataError, match="--period"):
        load_table(path)
    table = load_table(path, period_s=0.5)
    assert table.period_s == 0.5
    np.testing.assert_allclose(table.timestamps, 0.5 * np.arange(10))


def test_headerless_values_csv(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("1.0,2.0\n3.0,4.0\n5.0,6.0\n")
    table = load_table(tmp_path / "h.csv", period_s=1.0)
    assert table.channels == ["ch0", "ch1"]
    np.testing.assert_array_equal(table.values[:, 1], [2.0, 4.0, 6.0])


def test_from_array_segments_and_fingerprint() -> None:
    values = np.ones((40, 2), dtype=np.float32) * np.arange(40)[:, None]
    values[10:20] = np.nan
    values[30, 1] = np.nan
    table = from_array(values, 0.5, channels=["x", "y"], start_time=100.0)
    assert table.segments == [(0, 10), (20, 40)]
    assert table.values[30, 1] == 29.0  # a missing value holds the channel's last one
    assert table.timestamps[2] == 101.0
    assert table.source == "array"
    assert fingerprint(table) == fingerprint(
        from_array(values, 0.5, channels=["x", "y"], start_time=100.0)
    )
    assert fingerprint(table) != fingerprint(
        from_array(values, 0.5, channels=["x", "z"], start_time=100.0)
    )
    one = from_array(np.arange(5.0), 1.0)
    gappy = np.arange(10.0)
    gappy[3] = np.nan
    assert from_array(gappy, 1.0).values[3, 0] == 3.0 and np.isnan(gappy[3])  # input untouched
    assert one.channels == ["ch0"] and one.values.shape == (5, 1)


def test_windows_are_contiguous_copies() -> None:
    table = from_array(np.arange(20.0), 1.0)
    x, end_rows = windows(table, 4, hop=3)
    np.testing.assert_array_equal(end_rows, [3, 6, 9, 12, 15, 18])
    assert x.flags.c_contiguous and x.shape == (6, 4, 1)
    x[0, 0, 0] = -1
    assert table.values[0, 0] == 0.0


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pip install pyarrow"):
            load_table(tmp_path / "x.parquet")
    else:
        pytest.skip("pyarrow is installed")


def test_npy_array_needs_a_period_and_loads_with_one(tmp_path):
    path = tmp_path / "values.npy"
    np.save(path, np.arange(60, dtype=np.float64).reshape(20, 3))
    with pytest.raises(DataError, match="--period"):
        load_table(path)
    table = load_table(path, period_s=0.5)
    assert table.channels == ["ch0", "ch1", "ch2"]
    assert table.period_s == 0.5 and table.values.shape == (20, 3)
    assert table.source == "values.npy"


def skipping_file(tmp_path: Path) -> Path:
    """1 Hz rows 0..299 with an anomaly over rows 100..199, and seconds 120, 140 and 160 missing
    (SKAB skips a second now and then)."""
    missing = {120, 140, 160}
    rows = [
        [iso(T0 + i), np.sin(i / 7), int(100 <= i < 200)] for i in range(300) if i not in missing
    ]
    return write_csv(tmp_path / "skip.csv", ["datetime", "v", "anomaly"], rows, sep=";")


def test_grid_rows_without_a_reading_are_marked_filled(tmp_path: Path) -> None:
    table = load_table(skipping_file(tmp_path))
    assert len(table.timestamps) == 300 and table.segments == [(0, 300)]
    np.testing.assert_array_equal(np.flatnonzero(table.filled), [120, 140, 160])
    assert any("3 grid row(s) had no reading" in n for n in table.notes)


def test_a_labelled_episode_is_not_split_by_rows_without_a_reading(tmp_path: Path) -> None:
    table = load_table(skipping_file(tmp_path))
    label = table.labels["anomaly"].astype(bool)
    # One run over rows 100..199: the filled rows inside it are not invented zeros.
    edges = np.flatnonzero(np.diff(np.r_[0, label.astype(np.int8), 0]))
    assert edges.tolist() == [100, 200]
    assert table.anomalous[[120, 140, 160]].all()  # never trained on either


def test_a_filled_row_at_the_end_of_an_episode_takes_no_label(tmp_path: Path) -> None:
    rows = [[iso(T0 + i), float(i), int(i < 10)] for i in range(20) if i != 10]
    table = load_table(write_csv(tmp_path / "e.csv", ["datetime", "v", "anomaly"], rows))
    assert table.filled[10] and not table.labels["anomaly"][10]
    assert table.labels["anomaly"][:10].all() and not table.labels["anomaly"][10:].any()


def test_arrays_have_no_filled_rows() -> None:
    table = from_array(np.arange(10.0), 1.0)
    assert table.filled.shape == (10,) and not table.filled.any()
