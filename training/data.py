"""Data in: load sensor recordings onto a regular time grid split into gap-free segments."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from daemon.grid import HOLD_PERIODS, hold_missing, to_grid

_TIME_NAME = re.compile(
    r"(unix[ _]?)?(timestamp|datetime|date[ _]?time|time|date|ts)([ _]?\(?(s|ms|sec|utc)\)?)?", re.I
)
_SEPARATORS = (",", ";", "\t")
_MS_FROM = 1e11  # unix ms are >= 1e11 from 1973 on; unix seconds only reach it in year 5138
_UNIX_S = (1e8, 4.2e9)  # 1973..2103: a numeric column in this range may be unix seconds
_REGULAR_SHARE = 0.95  # share of time steps within 1 % of the period for data to count as regular


class DataError(ValueError):
    """Input data cannot be used; the message says what and how to fix it (one line)."""


@dataclass
class SensorTable:
    """Sensor values on a regular grid, with labels, gap-free segments and what was done to them."""

    timestamps: np.ndarray  # float64 unix seconds on the grid t0 + i * period_s, [T]
    values: np.ndarray  # float32 [T, C]; NaN only in rows outside every segment
    channels: list[str]
    # label column -> int8 [T] (0/1), max within a grid bin; a filled row (below) has no label of
    # its own: it is 1 only inside a labelled run (1 on both sides), so runs are never split
    labels: dict[str, np.ndarray]
    period_s: float
    segments: list[tuple[int, int]]  # [start, stop) rows of gap-free data (short gaps filled)
    constant_channels: list[str]  # kept as channels; the trainer decides what to do with them
    source: str  # file name or "array"
    notes: list[str]  # what was done to the data, for people to read
    # [T] bool: grid rows that no reading fell into (values interpolated or absent); metrics
    # leave them out, since their labels were never observed
    filled: np.ndarray

    @property
    def anomalous(self) -> np.ndarray:
        """Rows where a label column named "anomaly" is 1 (all False if there is none)."""
        out = np.zeros(len(self.timestamps), dtype=bool)
        for name, label in self.labels.items():
            if name.lower() == "anomaly":
                out |= label == 1
        return out


def load_table(
    path: str | Path,
    *,
    time_column: str | None = None,
    channels: Sequence[str] | None = None,
    label_columns: Sequence[str] = ("anomaly", "changepoint"),
    period_s: float | None = None,
    max_gap_s: float | None = None,
) -> SensorTable:
    """Load a CSV, Parquet or .npy recording onto a regular grid of `period_s` (inferred if None).

    A .npy array [T, C] has no timestamps: `period_s` is required and channels are ch0, ch1, ...
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if period_s is None:
            raise DataError(f"{path.name}: a .npy array has no timestamps; pass --period SECONDS")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
        table = from_array(np.asarray(array, dtype=np.float64), period_s)
        table.source = path.name
        return table
    frame = _read_frame(path)
    by_lower = {c.lower(): c for c in frame.columns}
    label_names = [by_lower[n.lower()] for n in label_columns if n.lower() in by_lower]
    tcol = _find_time_column(frame, time_column, label_names, path.name)
    others = [c for c in frame.columns if c != tcol and c not in label_names]
    # An all-empty column (e.g. from a trailing separator) would leave no gap-free rows at all.
    numeric = [c for c in others if ptypes.is_numeric_dtype(frame[c]) and frame[c].notna().any()]
    notes: list[str] = []
    if channels is None:
        chosen = numeric
        if skipped := [c for c in others if c not in numeric]:
            notes.append(f"ignored non-numeric or empty column(s): {', '.join(skipped)}")
    else:
        chosen = list(channels)
        if used := [c for c in chosen if c in label_names or c == tcol]:
            raise DataError(f"{', '.join(used)}: time/label columns cannot be channels")
        if unknown := [c for c in chosen if c not in numeric]:
            raise DataError(
                f"unknown channel(s) {', '.join(unknown)}; available: {', '.join(numeric)}"
            )
    if not chosen:
        raise DataError(f"{path.name} has no numeric channel columns")
    values = frame[chosen].to_numpy(dtype=np.float64, na_value=np.nan)
    labels = {
        n: pd.to_numeric(frame[n], errors="coerce").fillna(0).to_numpy() > 0 for n in label_names
    }
    times = None
    if tcol is None:
        if period_s is None:
            raise DataError(f"{path.name}: no timestamp column found; pass --period SECONDS")
    else:
        times = _parse_times(frame[tcol], tcol)
        keep = ~np.isnan(times)
        if not keep.all():
            notes.append(f"dropped {int((~keep).sum())} row(s) with unparseable timestamps")
        order = np.flatnonzero(keep)[np.argsort(times[keep], kind="stable")]
        times = times[order]
        # Rows with equal timestamps keep their file order: the first one's values win (the
        # daemon's rule for a reading that lands in a slot already filled, daemon/grid.py).
        values, labels = values[order], {n: a[order] for n, a in labels.items()}
    return _build(values, chosen, labels, times, period_s, max_gap_s, 0.0, path.name, notes)


def from_array(
    values: np.ndarray,
    period_s: float,
    *,
    channels: Sequence[str] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    start_time: float = 0.0,
) -> SensorTable:
    """Wrap values [T, C] (or [T]) sampled every `period_s`; NaN rows split segments as in files."""
    data = np.array(values, dtype=np.float64)  # a copy: gap filling works in place
    data = data[:, None] if data.ndim == 1 else data
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise DataError(f"values must have shape [T, C] with T, C > 0, got {np.shape(values)}")
    names = list(channels) if channels is not None else [f"ch{i}" for i in range(data.shape[1])]
    if len(names) != data.shape[1]:
        raise DataError(f"{len(names)} channel names for {data.shape[1]} value columns")
    labs: dict[str, np.ndarray] = {}
    for name, label in (labels or {}).items():
        arr = np.nan_to_num(np.asarray(label, dtype=np.float64))
        if arr.shape != (data.shape[0],):
            raise DataError(f"label {name!r} has shape {arr.shape}, expected ({data.shape[0]},)")
        labs[name] = arr > 0
    return _build(data, names, labs, None, period_s, None, start_time, "array", [])


def windows(
    table: SensorTable,
    window: int,
    hop: int = 1,
    *,
    segments: Sequence[tuple[int, int]] | None = None,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows [N, window, C] inside segments, and the row index of each window's last row."""
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be >= 1, got {window} and {hop}")
    n_rows = len(table.timestamps)
    segs = table.segments if segments is None else segments
    if any(not 0 <= s <= e <= n_rows for s, e in segs):
        raise ValueError(f"segments must lie within [0, {n_rows}]")
    ends = [np.arange(s + window - 1, e, hop, dtype=np.int64) for s, e in segs if e - s >= window]
    end_rows = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    if exclude is not None:
        excluded = np.asarray(exclude, dtype=bool)
        if excluded.shape != (n_rows,):
            raise ValueError(f"exclude has shape {excluded.shape}, expected ({n_rows},)")
        count = np.r_[0, np.cumsum(excluded)]
        end_rows = end_rows[count[end_rows + 1] == count[end_rows + 1 - window]]
    starts = end_rows - (window - 1)
    out = np.empty((len(end_rows), window, table.values.shape[1]), dtype=np.float32)
    # One gather per window position keeps memory at the output size (no [N, window] index array).
    for j in range(window):
        out[:, j] = table.values[starts + j]
    return out, end_rows


def normal_segments(
    table: SensorTable, segments: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """Segments split at anomalous rows, so training never sees labelled anomalies."""
    anomalous = table.anomalous
    out: list[tuple[int, int]] = []
    for s, e in table.segments if segments is None else segments:
        out += [(s + a, s + b) for a, b in _runs(~anomalous[s:e])]
    return out


def split_heldback(
    table: SensorTable, fraction: float = 0.2, *, min_rows: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, heldback) segments: the last `fraction` (at least `min_rows`) of normal rows."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    normal = normal_segments(table)
    total = sum(e - s for s, e in normal)
    held = max(round(fraction * total), min_rows)
    if held >= total and held > 0:
        raise DataError(f"only {total} normal rows: too few to hold back {held} for calibration")
    cut = total - held  # normal rows for training, all earlier in time than the held-back ones
    train: list[tuple[int, int]] = []
    heldback: list[tuple[int, int]] = []
    for s, e in normal:
        take = min(max(cut, 0), e - s)
        cut -= e - s
        if take > 0:
            train.append((s, s + take))
        if s + take < e:
            heldback.append((s + take, e))
    return train, heldback


def fingerprint(table: SensorTable) -> str:
    """sha256 hex of the channel names, timestamps and values."""
    digest = hashlib.sha256(json.dumps(table.channels).encode())
    digest.update(np.ascontiguousarray(table.timestamps, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(table.values, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            try:
                frame = pd.read_parquet(path)
            except ImportError as exc:
                raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        else:
            with path.open(encoding="utf-8-sig") as f:
                head = f.readline()
            sep = max(_SEPARATORS, key=head.count)
            fields = pd.to_numeric(pd.Series(head.split(sep)), errors="coerce")
            headerless = bool(fields.notna().all())
            frame = pd.read_csv(
                path, sep=sep, header=None if headerless else 0, encoding="utf-8-sig"
            )
            if headerless:
                frame.columns = [f"ch{i}" for i in range(frame.shape[1])]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name}: cannot read as CSV: {exc}".splitlines()[0]) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path.name} has no data rows")
    return frame


def _find_time_column(
    frame: pd.DataFrame, given: str | None, labels: list[str], source: str
) -> str | None:
    if given is not None:
        if given not in frame.columns:
            raise DataError(f"no time column {given!r} in {source}; columns: {', '.join(frame)}")
        return given
    cols = [c for c in frame.columns if c not in labels]
    for c in cols:
        if _TIME_NAME.fullmatch(c):
            return c
    if cols and not ptypes.is_numeric_dtype(frame[cols[0]]):
        sample = frame[cols[0]].dropna().head(100).astype(str)
        parsed = pd.to_datetime(sample, errors="coerce", utc=True, format="ISO8601")
        if len(sample) and parsed.notna().mean() >= 0.9:
            return cols[0]
    for c in cols:
        if ptypes.is_numeric_dtype(frame[c]) and not ptypes.is_bool_dtype(frame[c]):
            v = frame[c].to_numpy(dtype=np.float64, na_value=np.nan)
            v = v[~np.isnan(v)]
            if len(v) >= 2 and v[-1] > v[0] and (np.diff(v) >= 0).all():
                lo, hi = _UNIX_S
                if lo <= v[0] <= hi or lo * 1e3 <= v[0] <= hi * 1e3:
                    return c
    return None


def _parse_times(column: pd.Series, name: str) -> np.ndarray:
    """Unix seconds (float64, NaN where unparseable) from ISO/RFC 3339 strings, unix s or ms."""
    if ptypes.is_numeric_dtype(column) and not ptypes.is_bool_dtype(column):
        seconds = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return seconds / 1e3 if np.nanmedian(np.abs(seconds)) >= _MS_FROM else seconds
    parsed = pd.to_datetime(column, errors="coerce", utc=True, format="ISO8601")
    if parsed.notna().sum() == 0:
        raise DataError(
            f"cannot parse time column {name!r} (e.g. {column.iloc[0]!r}): "
            "expected ISO 8601 / RFC 3339, unix seconds or unix milliseconds"
        )
    since_epoch = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return since_epoch.to_numpy(dtype=np.float64, na_value=np.nan)


def _infer_period(times: np.ndarray) -> float:
    """Median time step refined over the span; rounded to 1 ms (or 1 µs) if that adds no drift."""
    steps = np.diff(times)
    steps = steps[steps > 0]
    if len(steps) == 0:
        raise DataError("cannot infer the sample period from one timestamp: pass --period SECONDS")
    rough = float(np.median(steps))
    k = np.rint(steps / rough)
    near = (k >= 1) & (np.abs(steps - k * rough) <= 0.01 * rough)
    period = float(steps[near].sum() / k[near].sum()) if near.any() else rough
    regular = near.mean() >= _REGULAR_SHARE
    n_steps = max((times[-1] - times[0]) / period, 1.0)
    # Regular data map sample i to grid row i: rounding may drift 5 % of a period over the span.
    tolerance = period * (0.05 / n_steps if regular else 0.01)
    for decimals in (3, 6, 9):
        rounded = round(period, decimals)
        if rounded > 0 and abs(rounded - period) <= tolerance:
            return rounded
    return period


def _build(
    values: np.ndarray,
    channels: list[str],
    labels: dict[str, np.ndarray],
    times: np.ndarray | None,
    period_s: float | None,
    max_gap_s: float | None,
    start_time: float,
    source: str,
    notes: list[str],
) -> SensorTable:
    """Grid, gap handling, segments and constant-channel check shared by files and arrays."""
    period = _infer_period(times) if period_s is None and times is not None else period_s
    if period is None or not np.isfinite(period) or period <= 0:
        raise DataError(f"sample period must be a positive number of seconds, got {period}")
    max_gap = 5.0 * period if max_gap_s is None else float(max_gap_s)
    if n_bad := int(np.isinf(values).sum()):
        values = np.where(np.isinf(values), np.nan, values)
        notes.append(f"{n_bad} infinite value(s) treated as missing")
    if times is None:
        grid = hold_missing(values)  # the daemon's rules for a missing channel value
        filled = np.zeros(len(grid), dtype=bool)
    else:
        start_time = float(times[0])
        idx = np.floor((times - start_time) / period + 0.5).astype(np.int64)  # daemon/grid.py
        n_grid = int(idx[-1]) + 1
        if n_grid > 20 * len(idx) + 1_000_000:
            raise DataError(
                f"{len(idx)} rows span {n_grid} periods of {period:g} s: check --period"
            )
        steps = np.diff(times)
        regular = np.mean(np.abs(steps - period) <= 0.01 * period) >= _REGULAR_SHARE
        if not regular or (np.diff(idx) == 0).any():
            notes.append(
                f"irregular timestamps: {len(idx)} rows put on a {period:g} s grid (first value "
                "of a channel in a slot wins, a missing channel holds its last value for up to "
                f"{HOLD_PERIODS} periods, as the daemon does)"
            )
        grid, _observed = to_grid(times, values, period)
        filled = np.bincount(idx, minlength=n_grid) == 0
        labels = {
            n: _join_across(np.bincount(idx[a], minlength=n_grid) > 0, filled)
            for n, a in labels.items()
        }
        if n_filled := int(filled.sum()):
            notes.append(f"{n_filled} grid row(s) had no reading: their labels are not counted")
    segments = _fill_gaps(grid, channels, period, max_gap, notes)
    if not segments:
        raise DataError(f"{source}: no usable data between gaps longer than {max_gap:g} s")
    in_segment = np.zeros(len(grid), dtype=bool)
    for s, e in segments:
        in_segment[s:e] = True
    used = grid[in_segment]
    spread, level = used.std(axis=0), np.abs(used.mean(axis=0))
    flat = spread <= 1e-6 * np.maximum(1.0, level)
    constant = [c for c, f in zip(channels, flat, strict=True) if f]
    if constant:
        notes.append(f"constant channel(s): {', '.join(constant)}")
    table = SensorTable(
        timestamps=start_time + np.arange(len(grid)) * period,
        values=np.ascontiguousarray(grid, dtype=np.float32),
        channels=list(channels),
        labels={n: a.astype(np.int8) for n, a in labels.items()},
        period_s=float(period),
        segments=segments,
        constant_channels=constant,
        source=source,
        notes=notes,
        filled=filled,
    )
    if n_anomalous := int(table.anomalous.sum()):
        notes.append(f"{n_anomalous} row(s) labelled anomalous: left out of training")
    return table


def _join_across(label: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """`label` where observed; on a filled row, 1 only if the observed rows around it are both 1."""
    out = label.copy()
    rows = np.flatnonzero(filled)
    real = np.flatnonzero(~filled)
    if len(rows) == 0 or len(real) == 0:
        return out
    before = real[np.clip(np.searchsorted(real, rows) - 1, 0, len(real) - 1)]
    after = real[np.clip(np.searchsorted(real, rows), 0, len(real) - 1)]
    out[rows] = label[before] & label[after]
    return out


def _fill_gaps(
    grid: np.ndarray, channels: list[str], period: float, max_gap: float, notes: list[str]
) -> list[tuple[int, int]]:
    """Interpolate short NaN runs in place; return segments between long ones."""
    n_rows = len(grid)
    long_marks = np.zeros(n_rows + 1, dtype=np.int64)
    for c in range(grid.shape[1]):
        runs = np.array(_runs(np.isnan(grid[:, c])), dtype=np.int64).reshape(-1, 2)
        starts, stops = runs[:, 0], runs[:, 1]
        # A hole's length is the time between the samples around it. Rows before the first
        # complete row or after the last are no hole: nothing to interpolate from on one side
        # (the daemon, too, starts its window at the first complete row).
        at_edge = (starts == 0) | (stops == n_rows)
        span = (stops - starts + 1) * period
        is_long = at_edge | (span > max_gap + 1e-9 * period)
        np.add.at(long_marks, starts[is_long], 1)
        np.add.at(long_marks, stops[is_long], -1)
    in_long_gap = np.cumsum(long_marks[:-1]) > 0
    segments: list[tuple[int, int]] = []
    filled = 0
    for s, e in _runs(~in_long_gap):
        block = grid[s:e]
        missing = np.isnan(block)
        if not missing.any():
            segments.append((s, e))
            continue
        # Every NaN run left here is a short hole between two rows.
        if empty := [channels[c] for c in np.flatnonzero(missing.all(axis=0))]:
            notes.append(f"dropped rows {s}..{e - 1}: no data for {', '.join(empty)} there")
            continue
        x = np.arange(e - s)
        for c in np.flatnonzero(missing.any(axis=0)):
            hole = missing[:, c]
            block[hole, c] = np.interp(x[hole], x[~hole], block[~hole, c])
        filled += int(missing.sum())
        segments.append((s, e))
    if filled:
        notes.append(f"filled {filled} missing value(s) in gaps <= {max_gap:g} s by interpolation")
    if n_long := int(in_long_gap.sum()):
        notes.append(f"{len(segments)} segment(s) between gaps > {max_gap:g} s ({n_long} rows)")
    return segments
