"""Fault kinds, fault specs, and the one function that injects a fault into sensor data.

`inject` is shared by the simulator and by retraining on real recordings, so every magnitude is
relative to the channel's own statistics in the array it is given, never in absolute units.

| kind              | each chosen channel, over [start, start+length)    | labelled rows |
|-------------------|----------------------------------------------------|---------------|
| spike             | 1–3 isolated samples jump by ±6–10 × level scale   | the spikes    |
| level_shift       | a step of ±3–4 × level scale                       | whole range   |
| drift             | a linear ramp from ~0 to ±4.5–5.5 × level scale    | whole range   |
| stuck             | frozen at its value at `start` (noise disappears)  | whole range   |
| correlation_break | a reversed copy of itself from another time, the   | whole range   |
|                   | most different in level: plausible values, but not |               |
|                   | the operating point the other channels show        |               |
| noise_burst       | extra noise: ≥ 5–8 × its own, ≥ 1–1.5 level std    | whole range   |

Level scale = robust std of the channel (1.4826 × MAD); noise scale = robust std of its first
differences / √2. Both fall back to plain std, and a constant channel to 1 % of its magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FAULT_KINDS = ("spike", "level_shift", "drift", "stuck", "correlation_break", "noise_burst")
ALL = "all"
FAULT_FORMAT = "[STREAM:]KIND[@START_S[+DURATION_S]]"

# 1.4826 × MAD estimates the std of Gaussian data while ignoring outliers already in a recording.
_MAD_TO_STD = 1.4826
# How many random source positions correlation_break compares when looking for a different level.
_BREAK_CANDIDATES = 16


@dataclass(frozen=True)
class FaultSpec:
    """One fault to inject: its kind, where (seconds) and, optionally, which stream."""

    kind: str
    start_s: float | None = None
    duration_s: float | None = None
    stream: str | None = None


def _bad(text: str, problem: str) -> ValueError:
    kinds = ", ".join((*FAULT_KINDS, ALL))
    return ValueError(f"bad fault {text!r}: {problem} (format {FAULT_FORMAT}; kinds: {kinds})")


def _seconds(text: str, part: str, name: str, *, positive: bool) -> float:
    try:
        value = float(part)
    except ValueError:
        raise _bad(text, f"{name} {part!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise _bad(text, f"{name} {part!r} must be finite and {need}")
    return value


def parse_fault(text: str) -> FaultSpec:
    """Parse `[STREAM:]KIND[@START_S[+DURATION_S]]`; `all` is expanded by `parse_faults`."""
    body, at, timing = text.strip().partition("@")
    stream, colon, kind = body.rpartition(":")
    if colon and not stream:
        raise _bad(text, "empty stream before ':'")
    if kind == ALL:
        raise _bad(text, "'all' is several faults; expand it with parse_faults or schedule_all")
    if kind not in FAULT_KINDS:
        raise _bad(text, f"unknown kind {kind!r}")
    start_s = duration_s = None
    if at:
        start_part, plus, duration_part = timing.partition("+")
        start_s = _seconds(text, start_part, "start", positive=False)
        if plus:
            duration_s = _seconds(text, duration_part, "duration", positive=True)
    return FaultSpec(kind=kind, start_s=start_s, duration_s=duration_s, stream=stream or None)


def parse_faults(texts: Sequence[str], total_s: float) -> list[FaultSpec]:
    """Parse several fault texts, expanding `[STREAM:]all[+DURATION_S]` with `schedule_all`."""
    specs: list[FaultSpec] = []
    for text in texts:
        body, plus, duration_part = text.strip().partition("+")
        stream, colon, kind = body.rpartition(":")
        if kind != ALL:
            specs.append(parse_fault(text))
            continue
        if colon and not stream:
            raise _bad(text, "empty stream before ':'")
        duration_s = _seconds(text, duration_part, "duration", positive=True) if plus else None
        specs.extend(
            dataclasses.replace(spec, stream=stream or None)
            for spec in schedule_all(total_s, duration_s)
        )
    return specs


def schedule_all(total_s: float, duration_s: float | None = None) -> list[FaultSpec]:
    """One fault of every kind, evenly spread over [10 %, 90 %] of the series with gaps between."""
    if not math.isfinite(total_s) or total_s <= 0:
        raise ValueError(f"total_s must be finite and > 0, got {total_s}")
    slot_s = 0.8 * total_s / len(FAULT_KINDS)
    # 5 % of the series, like simulate's default, and well inside a slot so gaps stay normal.
    length_s = 0.05 * total_s if duration_s is None else duration_s
    if not 0 < length_s < slot_s:
        raise ValueError(
            f"duration_s {length_s:g} must be > 0 and < {slot_s:g} s so that "
            f"{len(FAULT_KINDS)} faults fit in {total_s:g} s with gaps between them"
        )
    offset_s = (slot_s - length_s) / 2
    return [
        FaultSpec(kind=kind, start_s=0.1 * total_s + i * slot_s + offset_s, duration_s=length_s)
        for i, kind in enumerate(FAULT_KINDS)
    ]


def _robust_std(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0
    mad = float(np.median(np.abs(finite - np.median(finite))))
    return _MAD_TO_STD * mad if mad > 0 else float(np.std(finite))


def _channel_scales(x: np.ndarray) -> tuple[float, float]:
    """(level scale, noise scale) of one channel, both > 0."""
    level = _robust_std(x)
    noise = _robust_std(np.diff(x)) / math.sqrt(2) if x.size > 1 else 0.0
    if level <= 0 and noise <= 0:
        # A constant channel has no scale of its own; use 1 % of its magnitude.
        finite = x[np.isfinite(x)]
        magnitude = float(np.abs(np.median(finite))) if finite.size else 0.0
        level = noise = 0.01 * magnitude if magnitude > 0 else 1.0
    return (level if level > 0 else noise), (noise if noise > 0 else level)


def channel_scales(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(level, noise) scale of every channel of [T, C] values, as `inject` measures them."""
    pairs = [_channel_scales(values[:, c].astype(np.float64)) for c in range(values.shape[1])]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _break_source(x: np.ndarray, a: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """A reversed stretch of the channel from another time, as far in level as we can find."""
    length = b - a
    segment_mean = float(np.nanmean(x[a:b]))
    starts = rng.integers(0, x.size - length + 1, size=_BREAK_CANDIDATES)
    starts = starts[np.abs(starts - a) >= length]  # no overlap: a genuinely different time
    if starts.size == 0:
        return x[a:b][::-1].copy()
    means = np.array([np.nanmean(x[s : s + length]) for s in starts])
    best = int(starts[np.argmax(np.abs(means - segment_mean))])
    return x[best : best + length][::-1].copy()


def inject(
    values: np.ndarray,
    kind: str,
    start: int,
    length: int,
    rng: np.random.Generator,
    channels: list[int] | None = None,
    scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inject one fault into a copy of float [T, C] values; return (copy, rows labelled [T]).

    `scales` = (level, noise) per channel, from `channel_scales` of representative data: pass it
    when `values` is short, since a few minutes of a machine in one regime understate how much
    its channels normally move (and so the fault's size).
    """
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
    if values.ndim != 2:
        raise ValueError(f"values must be [T, C], got shape {values.shape}")
    out = values.astype(np.result_type(values.dtype, np.float32), copy=True)
    n_rows, n_channels = out.shape
    mask = np.zeros(n_rows, dtype=bool)
    a = min(max(int(start), 0), n_rows)
    b = min(max(int(start) + int(length), a), n_rows)
    if b <= a or n_channels == 0:
        return out, mask
    if channels is None:
        count = min(n_channels, int(rng.integers(1, 3)))
        channels = sorted(int(c) for c in rng.choice(n_channels, size=count, replace=False))
    bad = [c for c in channels if not 0 <= c < n_channels]
    if bad:
        raise ValueError(f"channels {bad} out of range for {n_channels} channels")

    span = b - a
    if kind == "spike":
        rows = rng.choice(np.arange(a, b), size=min(span, int(rng.integers(1, 4))), replace=False)
        mask[rows] = True
    else:
        mask[a:b] = True
    for c in channels:
        x = values[:, c].astype(np.float64)
        if scales is None:
            level, noise = _channel_scales(x)
        else:
            level, noise = float(scales[0][c]), float(scales[1][c])
        sign = rng.choice((-1.0, 1.0))
        if kind == "spike":
            out[rows, c] += sign * rng.uniform(6.0, 10.0, size=rows.size) * level
        elif kind == "level_shift":
            out[a:b, c] += sign * rng.uniform(3.0, 4.0) * level
        elif kind == "drift":
            # Starts one step above zero so even a one-row drift changes something.
            ramp = np.arange(1, span + 1) / span
            out[a:b, c] += sign * rng.uniform(4.5, 5.5) * level * ramp
        elif kind == "stuck":
            out[a:b, c] = values[a, c]
        elif kind == "correlation_break":
            out[a:b, c] = _break_source(x, a, b, rng)
        else:  # noise_burst
            # A loose connector or interference: extra noise at least 5-8 x the sensor's own
            # and at least the channel's normal swing (on a sensor whose noise is tiny
            # against its range, 5 x the noise alone is invisible to anyone).
            factor = rng.uniform(5.0, 8.0)
            std = max(noise * math.sqrt(factor**2 - 1), rng.uniform(1.0, 1.5) * level)
            out[a:b, c] += rng.normal(0.0, std, size=span)
    return out, mask
