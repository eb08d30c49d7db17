"""A synthetic centrifugal pump with injectable faults, for demos, tests and benchmarks.

One speed command drives everything: the pump holds one of a few set points for minutes to tens
of minutes, moves between them with smooth ramps, and wanders slowly around them. Flow, pressure
and power follow the pump affinity laws; current follows power through the motor; temperatures
follow the heat from losses with first-order lags and ambient follows a mild daily cycle. A slow
condition drift (wear) and a slow pressure-sensor offset drift keep the data from being stationary.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.fault import FaultSpec, channel_scales, inject

CHANNELS = [
    "motor_current_a",
    "vibration_mm_s",
    "bearing_temp_c",
    "fluid_temp_c",
    "pressure_bar",
    "flow_m3_h",
    "speed_rpm",
    "power_kw",
]
DEFAULT_START_TIME = 1_767_225_600.0  # 2026-01-01T00:00:00Z

RATED_RPM = 2950.0
# Measurement noise std per channel, in channel units (before each machine's ±20 % factor).
NOISE_STD = np.array([0.25, 0.05, 0.1, 0.05, 0.03, 0.4, 3.0, 0.12])
HOLD_S = (180.0, 1800.0)  # a set point lasts 3–30 minutes
RAMP_S = (20.0, 90.0)  # a VFD ramps between set points in tens of seconds
WALK_TAU_S, WALK_STD = 600.0, 0.015  # slow wander of the speed around its set point
WEAR_TAU_S = 3 * 86400.0  # condition drift over days (real wear takes weeks); std 1, scaled below
OFFSET_TAU_S, OFFSET_STD = 12 * 3600.0, 0.03  # pressure sensor offset drift, bar
FLUID_TAU_S, BEARING_TAU_S = 1200.0, 600.0  # thermal lags: tank/pipework vs bearing housing
DAY_S = 86_400.0
REFERENCE_S, REFERENCE_SEED = 6 * 3600.0, 1_000_003


class MachineSimulator:
    """One pump: `step(n)` returns its next n samples [n, 8] and keeps its state between calls."""

    def __init__(
        self,
        seed: int,
        period_s: float = 1.0,
        start_time: float = DEFAULT_START_TIME,
        machine: int = 0,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        # `machine` fixes how the pump is built (one model serves every stream of that build);
        # `seed` fixes this run of it (regimes, wander, noise).
        build = np.random.default_rng(np.random.SeedSequence([machine, 7919]))
        start, self._regime_rng, self._walk_rng, self._noise_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
        )
        self.period_s = period_s
        # Each machine is a little different: its set points, size, efficiency, sensors.
        self._set_points = np.sort(build.uniform([0.5, 0.62, 0.74, 0.86], [0.6, 0.72, 0.84, 1.0]))
        self._rated_flow = build.uniform(55.0, 62.0)
        self._eta_max = build.uniform(0.66, 0.74)
        self._magnetising_a = build.uniform(20.0, 24.0)
        self._vibration_base = build.uniform(0.9, 1.15)
        self._ambient_c = build.uniform(18.0, 24.0)
        self._noise_std = NOISE_STD * build.uniform(0.8, 1.2, size=len(CHANNELS))
        self._t = start_time
        # State: start mid-regime, with temperatures already settled, so there is no warm-up.
        self._target = float(start.choice(self._set_points))
        self._ramp_from, self._ramp_left, self._ramp_len = self._target, 0, 1
        self._hold_left = self._draw_steps(HOLD_S)
        self._walk = start.normal(0.0, WALK_STD)
        # Pumps of one build differ a little in condition; most of the wear range is slow drift.
        self._wear = start.normal(0.0, 0.5)
        self._offset = start.normal(0.0, OFFSET_STD)
        speed = np.array([self._target + self._walk])
        fluid_eq, bearing_eq = self._thermal_targets(speed, np.array([self._wear]), self._t)
        self._fluid_c = float(fluid_eq[0])
        self._bearing_c = float(bearing_eq[0])

    def _draw_steps(self, range_s: tuple[float, float]) -> int:
        return max(1, round(self._regime_rng.uniform(*range_s) / self.period_s))

    def _speed_ratio(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Speed ratio (speed / rated), wear and pressure offset for the next n samples."""
        shocks = self._walk_rng.standard_normal((n, 3))
        a_walk, a_wear, a_offset = (
            math.exp(-self.period_s / tau) for tau in (WALK_TAU_S, WEAR_TAU_S, OFFSET_TAU_S)
        )
        # Ornstein-Uhlenbeck steps with the stationary std set by the constants above.
        k_walk, k_wear, k_offset = (
            std * math.sqrt(1 - a * a)
            for std, a in ((WALK_STD, a_walk), (1.0, a_wear), (OFFSET_STD, a_offset))
        )
        speed, wear, offset = np.empty(n), np.empty(n), np.empty(n)
        for i in range(n):
            if self._hold_left == 0:
                choices = self._set_points[self._set_points != self._target]
                self._ramp_from = self._command()
                self._target = float(self._regime_rng.choice(choices))
                self._ramp_len = self._ramp_left = self._draw_steps(RAMP_S)
                self._hold_left = self._ramp_len + self._draw_steps(HOLD_S)
            self._hold_left -= 1
            self._ramp_left = max(0, self._ramp_left - 1)
            self._walk = a_walk * self._walk + k_walk * shocks[i, 0]
            self._wear = a_wear * self._wear + k_wear * shocks[i, 1]
            self._offset = a_offset * self._offset + k_offset * shocks[i, 2]
            speed[i] = min(1.0, max(0.45, self._command() + self._walk))
            wear[i], offset[i] = self._wear, self._offset
        return speed, wear, offset

    def _command(self) -> float:
        # A cosine ramp: smooth start and end, like a VFD with S-curve acceleration.
        progress = 1.0 - self._ramp_left / self._ramp_len
        blend = 0.5 - 0.5 * math.cos(math.pi * progress)
        return self._ramp_from + (self._target - self._ramp_from) * blend

    def _hydraulics(self, s: np.ndarray, wear: np.ndarray) -> tuple[np.ndarray, ...]:
        """Flow, pressure, hydraulic and electrical power for speed ratio s (affinity laws)."""
        flow = self._rated_flow * (s - 0.2) / 0.8  # system curve with static head: Q ≈ 0 at 20 %
        pressure = 2.0 + 4.0 * s**2
        hydraulic_kw = flow * pressure / 36.0  # m³/h × bar / 36 = kW
        eta = (self._eta_max - 0.25 * (s - 0.85) ** 2) * (1 - 0.02 * wear)
        electric_kw = hydraulic_kw / eta / 0.93 + 0.6  # motor + drive efficiency, no-load loss
        return flow, pressure, hydraulic_kw, electric_kw

    def _thermal_targets(
        self, s: np.ndarray, wear: np.ndarray, t0: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Steady-state fluid and bearing temperatures the lags move towards."""
        _, _, hydraulic_kw, electric_kw = self._hydraulics(s, wear)
        t = t0 + self.period_s * np.arange(s.size)
        # Ambient peaks mid-afternoon (UTC); fluid is heated by the pump's losses.
        ambient = self._ambient_c + 2.5 * np.sin(2 * np.pi * ((t / DAY_S) % 1.0 - 0.375))
        fluid = ambient + 6.0 + 0.8 * (electric_kw - hydraulic_kw)
        bearing = fluid + 8.0 + 22.0 * s**2 + 1.5 * wear
        return fluid, bearing

    def step(self, n: int) -> np.ndarray:
        """The next n samples, float64 [n, 8] in CHANNELS order."""
        s, wear, offset = self._speed_ratio(n)
        flow, pressure, _, electric_kw = self._hydraulics(s, wear)
        fluid_eq, bearing_eq = self._thermal_targets(s, wear, self._t)
        fluid, bearing = np.empty(n), np.empty(n)
        a_fluid = math.exp(-self.period_s / FLUID_TAU_S)
        a_bearing = math.exp(-self.period_s / BEARING_TAU_S)
        for i in range(n):
            self._fluid_c = a_fluid * self._fluid_c + (1 - a_fluid) * fluid_eq[i]
            # The bearing follows its own target, which moves with the (lagging) fluid.
            target = bearing_eq[i] - fluid_eq[i] + self._fluid_c
            self._bearing_c = a_bearing * self._bearing_c + (1 - a_bearing) * target
            fluid[i], bearing[i] = self._fluid_c, self._bearing_c
        self._t += n * self.period_s
        torque_a = electric_kw * 1000.0 / (math.sqrt(3) * 400.0 * 0.9)  # 400 V, power factor 0.9
        current = np.sqrt(self._magnetising_a**2 + torque_a**2)
        # Vibration grows with speed² and away from the best-efficiency point, and with wear.
        vibration = self._vibration_base * (0.5 + 2.5 * s**2) * (1 + 0.05 * wear)
        vibration += 3.0 * (s - 0.85) ** 2
        clean = np.column_stack(
            [
                current,
                vibration,
                bearing,
                fluid,
                pressure + offset,
                flow,
                RATED_RPM * s,
                electric_kw,
            ]
        )
        noise = self._noise_rng.standard_normal((n, len(CHANNELS))) * self._noise_std
        noise[:, 1] *= 1 + 0.3 * vibration  # vibration RMS is noisier when it is larger
        return clean + noise


@dataclass
class SimulatedData:
    """A simulated series with its ground-truth anomaly labels and the faults that made them."""

    timestamps: np.ndarray  # float64 unix seconds [T]
    values: np.ndarray  # float64 [T, C]
    anomaly: np.ndarray  # int8 [T], 1 where a fault is labelled
    channels: list[str]
    faults: list[tuple[FaultSpec, int, int]]  # (spec, start row, stop row)


def simulate(
    rows: int,
    seed: int,
    faults: Sequence[FaultSpec] = (),
    period_s: float = 1.0,
    start_time: float = DEFAULT_START_TIME,
    machine: int = 0,
) -> SimulatedData:
    """Simulate `rows` samples of one pump and inject `faults` (their `stream` is not used)."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    values = MachineSimulator(seed, period_s, start_time, machine).step(rows)
    scales = reference_scales(machine, period_s) if faults else None
    # A separate seed stream so adding a fault never changes the normal data.
    rng = np.random.default_rng([seed, 0xFA017])
    anomaly = np.zeros(rows, dtype=bool)
    placed: list[tuple[FaultSpec, int, int]] = []
    for spec in faults:
        if spec.duration_s is None:
            length = max(30, round(0.05 * rows))
        else:
            length = max(1, round(spec.duration_s / period_s))
        if spec.start_s is None:
            low = int(0.1 * rows)
            start = int(rng.integers(low, max(low, int(0.9 * rows) - length) + 1))
        else:
            start = round(spec.start_s / period_s)
        values, mask = inject(values, spec.kind, start, length, rng, scales=scales)
        anomaly |= mask
        placed.append((spec, min(start, rows), min(start + length, rows)))
    return SimulatedData(
        timestamps=start_time + period_s * np.arange(rows, dtype=np.float64),
        values=values,
        anomaly=anomaly.astype(np.int8),
        channels=list(CHANNELS),
        faults=placed,
    )


def _format_times(timestamps: np.ndarray) -> list[str]:
    """RFC 3339 UTC with 'Z'; fractional digits only when some timestamp needs them."""
    micros = np.round(timestamps * 1e6).astype(np.int64)
    unit = "s" if np.all(micros % 1_000_000 == 0) else "ms" if np.all(micros % 1000 == 0) else "us"
    text = np.datetime_as_string(micros.astype("datetime64[us]"), unit=unit)
    return [f"{t}Z" for t in text]


@functools.lru_cache(maxsize=8)
def reference_scales(machine: int = 0, period_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(level, noise) scale per channel of the build's normal operation, for sizing faults.

    Measured on ~6 hours of one run: a short run sits in one or two set points and would make
    "4 standard deviations" a small fault against the range a model is trained on.
    """
    rows = max(1000, round(REFERENCE_S / period_s))
    values = MachineSimulator(REFERENCE_SEED, period_s, machine=machine).step(rows)
    return channel_scales(values)


def simulate_runs(
    rows: int,
    seed: int,
    runs: int,
    faults: Sequence[FaultSpec] = (),
    period_s: float = 1.0,
    start_time: float = DEFAULT_START_TIME,
    gap_s: float = 3600.0,
) -> SimulatedData:
    """`runs` separate runs of the same pump build (seeds seed, seed+1, ...), `gap_s` apart.

    Like recording several pumps of one build, or one pump on several days: the gaps split the
    series, so the trainer never builds a window across two runs, and its held-back tail is
    (mostly) a run it did not train on.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    parts: list[SimulatedData] = []
    t0 = start_time
    for r in range(runs):
        n = rows // runs + (1 if r < rows % runs else 0)
        part = simulate(n, seed + r, faults, period_s, t0)
        parts.append(part)
        t0 = (part.timestamps[-1] if n else t0) + gap_s
    return SimulatedData(
        timestamps=np.concatenate([p.timestamps for p in parts]),
        values=np.concatenate([p.values for p in parts]),
        anomaly=np.concatenate([p.anomaly for p in parts]),
        channels=list(CHANNELS),
        faults=[f for p in parts for f in p.faults],
    )


def write_csv(path: str | os.PathLike[str], data: SimulatedData) -> None:
    """Write `timestamp,<channels...>,anomaly` with RFC 3339 times and 6 significant digits."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["timestamp", *data.channels, "anomaly"])
        for stamp, row, label in zip(
            _format_times(data.timestamps), data.values, data.anomaly, strict=True
        ):
            writer.writerow([stamp, *(f"{v:.6g}" for v in row), int(label)])
