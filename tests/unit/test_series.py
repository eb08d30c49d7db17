"""A CSV read for `oteo replay`: channels, timestamps read as by `oteo train`, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.series import SeriesError, read_series


def write(tmp_path: Path, text: str, name: str = "run.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_label_and_time_columns_are_not_channels(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "timestamp,current_a,pressure_bar,anomaly,changepoint\n"
        "2026-01-01T00:00:00Z,24.5,4.3,0,0\n"
        "2026-01-01T00:00:01Z,24.6,4.4,1,1\n"
        "2026-01-01T00:00:02Z,24.7,4.5,0,0\n",
    )
    series = read_series(path)
    assert series.channels == ["current_a", "pressure_bar"]
    assert series.values.tolist() == [[24.5, 4.3], [24.6, 4.4], [24.7, 4.5]]
    assert series.timestamps is not None
    assert series.timestamps.tolist() == [1767225600.0, 1767225601.0, 1767225602.0]
    assert series.period_s == 1.0


def test_skab_layout_semicolons_and_times_without_offset_are_utc(tmp_path: Path) -> None:
    """As `oteo train` reads them: a timestamp without an offset is UTC."""
    path = write(
        tmp_path,
        "datetime;Accelerometer1RMS;Volume Flow RateRMS;anomaly;changepoint\n"
        "2020-03-09 10:14:33;0.0265878;32.0;0.0;0.0\n"
        "2020-03-09 10:14:34;0.0261697;32.0;0.0;0.0\n",
    )
    series = read_series(path)
    assert series.channels == ["Accelerometer1RMS", "Volume Flow RateRMS"]
    assert series.timestamps is not None
    assert series.timestamps[0] == 1583748873.0


def test_unix_milliseconds_become_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, "ts,a\n1767225600000,1\n1767225600500,2\n1767225601000,3\n")
    series = read_series(path)
    assert series.timestamps is not None
    assert series.timestamps.tolist() == [1767225600.0, 1767225600.5, 1767225601.0]
    assert series.period_s == 0.5


def test_rows_are_put_in_time_order_and_a_repeated_time_keeps_the_last(tmp_path: Path) -> None:
    path = write(tmp_path, "time,a\n3,30\n1,10\n2,20\n2,21\n")
    series = read_series(path)
    assert series.timestamps is not None
    assert series.timestamps.tolist() == [1.0, 2.0, 3.0]
    assert series.values[:, 0].tolist() == [10.0, 21.0, 30.0]
    assert any("time order" in n for n in series.notes)
    assert any("repeated timestamp" in n for n in series.notes)


def test_rows_with_empty_or_non_finite_values_are_skipped_and_said(tmp_path: Path) -> None:
    path = write(tmp_path, "time,a,b\n1,1,2\n2,,2\n3,nan,2\n4,4,2\n")
    series = read_series(path)
    assert series.values.tolist() == [[1.0, 2.0], [4.0, 2.0]]
    assert np.isfinite(series.values).all()
    assert series.notes == ["skipped 2 row(s) with empty or non-finite values"]


def test_channels_can_be_chosen(tmp_path: Path) -> None:
    path = write(tmp_path, "time,a,b,c\n1,1,2,3\n2,1,2,3\n")
    assert read_series(path, channels=["c", "a"]).channels == ["c", "a"]


def test_non_numeric_columns_are_ignored_by_default(tmp_path: Path) -> None:
    path = write(tmp_path, "time,a,site\n1,1,north\n2,2,north\n")
    series = read_series(path)
    assert series.channels == ["a"]
    assert series.notes == ["ignored non-numeric column(s): site"]


def test_a_file_without_header_or_time_replays_with_a_period(tmp_path: Path) -> None:
    path = write(tmp_path, "1,2\n3,4\n")
    series = read_series(path, period_s=0.5, need_timestamps=False)
    assert series.channels == ["ch0", "ch1"]
    assert series.timestamps is None
    assert (series.period_s, series.span_s) == (0.5, 1.0)


@pytest.mark.parametrize(
    ("text", "kwargs", "error"),
    [
        ("", {}, "run.csv: empty file"),
        ("time,a\n1,1\n2,x\n", {}, "run.csv:3: column 'a': 'x' is not a number"),
        ("time,a\n1,1\n2\n", {}, "run.csv:3: 1 fields, the header has 2"),
        ("time,a,a\n1,1,1\n", {}, "run.csv: column 'a' appears twice in the header"),
        ("a,b\n1,2\n", {}, "run.csv: no time column (timestamp, time, date, datetime, ts); pass"),
        ("time,a\nyesterday,1\n", {}, "run.csv:2: timestamp 'yesterday' is neither RFC 3339"),
        ("time,a\n-5,1\n", {}, "run.csv:2: timestamp '-5': bad_timestamp: ts -5.0 is out of range"),
        ("time,a\n1,1\n", {}, "run.csv: cannot tell the sample period; pass --period SECONDS"),
        ("time,a\n1,\n2,\n", {}, "run.csv: no complete data rows to replay"),
        ("time,a\n1,1\n", {"channels": ["b"]}, "run.csv: no column(s) b; columns: time, a"),
        ("time,a\n1,1\n", {"channels": ["time"]}, "run.csv: time is a time or label column"),
        ("time,a\n1,1\n", {"time_column": "t"}, "run.csv: no column 't'; columns: time, a"),
        ("time,name\n1,x\n", {}, "run.csv: no numeric columns to send as channels"),
    ],
)
def test_a_bad_csv_is_one_line_naming_the_file(
    tmp_path: Path, text: str, kwargs: dict[str, object], error: str
) -> None:
    with pytest.raises(SeriesError) as caught:
        read_series(write(tmp_path, text), **kwargs)  # type: ignore[arg-type]
    assert str(caught.value).startswith(error), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match=r"absent\.csv: no such file$"):
        read_series(tmp_path / "absent.csv")


def test_a_binary_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(SeriesError, match=r"cannot read as CSV"):
        read_series(path)
