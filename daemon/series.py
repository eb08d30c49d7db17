"""A CSV file of sensor readings, read for `oteo replay`: channels, values and timestamps.

Read as `oteo train` reads a CSV (the separator `,` `;` or tab from the header; a header-less
file's columns named ch0, ch1, …; timestamps RFC 3339 / ISO 8601, without an offset taken as
UTC, or unix seconds or milliseconds; label columns never channels; rows put in time order)
and then held to the daemon's rule for a reading's `ts` (`daemon.messages.parse_timestamp`).
Only the standard library and numpy: the edge runtime has no pandas.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from daemon.reading import UNIX_TS_MAX, PayloadError, parse_timestamp

LABEL_COLUMNS = ("anomaly", "changepoint")
_TIME_NAME = re.compile(
    r"(unix[ _]?)?(timestamp|date[ _]?time|time|date|ts)([ _]?\(?(s|ms|sec|utc)\)?)?", re.I
)
_SEPARATORS = (",", ";", "\t")
_MS_FROM = 1e11  # as `oteo train`: numbers this large are unix milliseconds


class SeriesError(ValueError):
    """The CSV cannot be replayed; the message is one line naming the file (and line)."""


@dataclass(frozen=True)
class Series:
    """A CSV's channels: values [T, C] in time order, with unix-second timestamps."""

    source: str
    channels: list[str]
    values: np.ndarray  # float64 [T, C], all finite
    timestamps: np.ndarray | None  # float64 [T], increasing; None without a time column
    period_s: float
    notes: list[str]  # what was left out, for the user

    @property
    def span_s(self) -> float:
        """Time from the first reading to one period after the last (one pass of a loop)."""
        return (
            len(self.values) * self.period_s
            if self.timestamps is None
            else float(self.timestamps[-1] - self.timestamps[0] + self.period_s)
        )


def read_series(
    path: Path,
    *,
    channels: Sequence[str] | None = None,
    time_column: str | None = None,
    label_columns: Sequence[str] = LABEL_COLUMNS,
    period_s: float | None = None,
    need_timestamps: bool = True,
) -> Series:
    """Read a CSV for replay; raise SeriesError with one line if it cannot be replayed."""
    header, rows, first_line = _read_rows(path)
    notes: list[str] = []
    tcol = _time_column(header, time_column, path.name)
    labels = {name.lower() for name in label_columns}
    chosen = _channel_columns(header, rows, tcol, labels, channels, path.name, notes)
    values = np.full((len(rows), len(chosen)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(chosen):
            values[i, j] = _number(row[col], path.name, first_line + i, header[col])
    complete = np.isfinite(values).all(axis=1)
    if not complete.any():
        raise SeriesError(f"{path.name}: no complete data rows to replay")
    if not complete.all():
        notes.append(f"skipped {int((~complete).sum())} row(s) with empty or non-finite values")
    timestamps = None
    if tcol is not None:
        timestamps = _timestamps([row[tcol] for row in rows], path.name, first_line)
        values, timestamps = values[complete], timestamps[complete]
        values, timestamps = _in_time_order(values, timestamps, notes)
    elif need_timestamps:
        raise SeriesError(
            f"{path.name}: no time column (timestamp, time, date, datetime, ts); pass "
            "--time-column NAME, or --now with --period SECONDS"
        )
    else:
        values = values[complete]
    period = period_s if period_s is not None else _period(timestamps, path.name)
    names = [header[c] for c in chosen]
    return Series(path.name, names, values, timestamps, period, notes)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], int]:
    """Header, data rows (all as wide as the header) and the file line of the first data row."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            head = fh.readline()
            fh.seek(0)
            separator = max(_SEPARATORS, key=head.count)
            table = [row for row in csv.reader(fh, delimiter=separator) if row]
    except FileNotFoundError as exc:
        raise SeriesError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SeriesError(f"{path}: cannot read as CSV: {exc}") from exc
    if not table:
        raise SeriesError(f"{path.name}: empty file")
    header, first_line = [name.strip() for name in table[0]], 2
    if all(_is_number(cell) for cell in header):  # no header row: name the columns like train
        header, first_line = [f"ch{i}" for i in range(len(header))], 1
    else:
        table = table[1:]
    if len(set(header)) != len(header):
        duplicate = next(name for name in header if header.count(name) > 1)
        raise SeriesError(f"{path.name}: column {duplicate!r} appears twice in the header")
    for i, row in enumerate(table):
        if len(row) != len(header):
            raise SeriesError(
                f"{path.name}:{first_line + i}: {len(row)} fields, the header has {len(header)}"
            )
    return header, table, first_line


def _time_column(header: list[str], given: str | None, source: str) -> int | None:
    if given is not None:
        if given not in header:
            raise SeriesError(f"{source}: no column {given!r}; columns: {', '.join(header)}")
        return header.index(given)
    for i, name in enumerate(header):
        if _TIME_NAME.fullmatch(name):
            return i
    return None


def _channel_columns(
    header: list[str],
    rows: list[list[str]],
    tcol: int | None,
    labels: set[str],
    given: Sequence[str] | None,
    source: str,
    notes: list[str],
) -> list[int]:
    others = [i for i, name in enumerate(header) if i != tcol and name.lower() not in labels]
    if given is not None:
        unknown = [name for name in given if name not in header]
        if unknown:
            raise SeriesError(f"{source}: no column(s) {', '.join(unknown)}; "
                              f"columns: {', '.join(header)}")  # fmt: skip
        excluded = [name for name in given if header.index(name) not in others]
        if excluded:
            raise SeriesError(f"{source}: {', '.join(excluded)} is a time or label column")
        return [header.index(name) for name in given]
    # Like `oteo train`: a column whose first value is not a number is not a channel.
    numeric = [i for i in others if not rows or _is_number(rows[0][i]) or not rows[0][i].strip()]
    if skipped := [header[i] for i in others if i not in numeric]:
        notes.append(f"ignored non-numeric column(s): {', '.join(skipped)}")
    if not numeric:
        raise SeriesError(f"{source}: no numeric columns to send as channels")
    return numeric


def _number(cell: str, source: str, line: int, column: str) -> float:
    text = cell.strip()
    if not text:
        return math.nan  # missing: the row is skipped
    try:
        return float(text)  # nan / inf parse too, and are skipped as missing
    except ValueError:
        raise SeriesError(f"{source}:{line}: column {column!r}: {text!r} is not a number") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _timestamps(cells: list[str], source: str, first_line: int) -> np.ndarray:
    """Unix seconds of every cell, checked against the daemon's rule for a reading's `ts`."""
    if all(_is_number(cell) for cell in cells):
        stamps = np.array([float(cell) for cell in cells])
        if len(stamps) and np.nanmedian(np.abs(stamps)) >= _MS_FROM:
            stamps = stamps / 1e3
    else:
        stamps = np.empty(len(cells))
        for i, cell in enumerate(cells):
            stamps[i] = _iso_time(cell.strip(), source, first_line + i)
    for i, ts in enumerate(stamps):
        try:
            parse_timestamp(float(ts))
        except PayloadError as exc:
            raise SeriesError(
                f"{source}:{first_line + i}: timestamp {cells[i]!r}: {exc} "
                f"(unix seconds below {UNIX_TS_MAX:g})"
            ) from None
    return stamps


def _iso_time(text: str, source: str, line: int) -> float:
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise SeriesError(
            f"{source}:{line}: timestamp {text!r} is neither RFC 3339 / ISO 8601 nor unix "
            "seconds; pass --time-column, or --now"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # as `oteo train` reads it
    return parsed.timestamp()


def _in_time_order(
    values: np.ndarray, stamps: np.ndarray, notes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by time; of rows with one timestamp the last is kept (as `oteo train` does)."""
    order = np.argsort(stamps, kind="stable")
    if (order != np.arange(len(order))).any():
        notes.append("rows put in time order")
    values, stamps = values[order], stamps[order]
    last = np.r_[stamps[1:] != stamps[:-1], True]
    if not last.all():
        notes.append(f"dropped {int((~last).sum())} row(s) with a repeated timestamp")
    return values[last], stamps[last]


def _period(stamps: np.ndarray | None, source: str) -> float:
    steps = np.diff(stamps) if stamps is not None else np.empty(0)
    if not len(steps):
        raise SeriesError(f"{source}: cannot tell the sample period; pass --period SECONDS")
    return float(np.median(steps))
