"""The simulated pump: plausible, correlated, continuous; faults labelled; CSV readable."""

import csv
from pathlib import Path

import numpy as np
import pytest

from training.fault import FaultSpec
from training.simulator import CHANNELS, MachineSimulator, simulate, write_csv

# Several hours at a 5 s period: many set-point changes, still fast.
HOURS_ROWS, HOURS_PERIOD_S = 6000, 5.0


@pytest.fixture(scope="module")
def hours() -> np.ndarray:
    return MachineSimulator(seed=3, period_s=HOURS_PERIOD_S).step(HOURS_ROWS)


def column(values: np.ndarray, name: str) -> np.ndarray:
    return values[:, CHANNELS.index(name)]


def test_step_returns_eight_channels_in_plausible_ranges(hours: np.ndarray) -> None:
    assert hours.shape == (HOURS_ROWS, 8) and hours.dtype == np.float64
    ranges = {
        "motor_current_a": (18, 40),
        "vibration_mm_s": (0.8, 4.5),
        "bearing_temp_c": (30, 80),
        "fluid_temp_c": (15, 45),
        "pressure_bar": (2.7, 6.3),
        "flow_m3_h": (18, 65),
        "speed_rpm": (1400, 2980),
        "power_kw": (2, 25),
    }
    for name, (low, high) in ranges.items():
        values = column(hours, name)
        assert low <= values.min() and values.max() <= high, name


def test_load_moves_between_set_points_smoothly(hours: np.ndarray) -> None:
    speed = column(hours, "speed_rpm")
    assert np.ptp(speed) > 500  # several operating regimes within hours
    one_second = MachineSimulator(seed=3).step(3600)
    assert np.abs(np.diff(column(one_second, "speed_rpm"))).max() < 150  # ramps, not jumps


def test_channels_are_correlated_through_load(hours: np.ndarray) -> None:
    def corr(a: str, b: str) -> float:
        return float(np.corrcoef(column(hours, a), column(hours, b))[0, 1])

    assert corr("motor_current_a", "power_kw") > 0.8
    assert corr("speed_rpm", "flow_m3_h") > 0.8
    assert corr("speed_rpm", "pressure_bar") > 0.8
    assert corr("speed_rpm", "vibration_mm_s") > 0.8


def test_bearing_temperature_lags_load(hours: np.ndarray) -> None:
    speed, bearing = column(hours, "speed_rpm"), column(hours, "bearing_temp_c")
    lag = round(600 / HOURS_PERIOD_S)  # the bearing's thermal time constant
    now = np.corrcoef(speed, bearing)[0, 1]
    later = np.corrcoef(speed[:-lag], bearing[lag:])[0, 1]
    assert later > now


def test_step_continues_state() -> None:
    sim = MachineSimulator(seed=11)
    chunked = np.vstack([sim.step(100), sim.step(100)])
    assert np.array_equal(chunked, MachineSimulator(seed=11).step(200))


def test_different_seeds_give_different_but_similar_machines() -> None:
    a, b = MachineSimulator(seed=1).step(2000), MachineSimulator(seed=2).step(2000)
    assert not np.allclose(a, b)
    assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 0.4 * a.mean(axis=0))


def test_simulate_is_deterministic_for_seed() -> None:
    faults = [FaultSpec("spike"), FaultSpec("drift", start_s=300.0, duration_s=60.0)]
    first, second = simulate(1000, seed=5, faults=faults), simulate(1000, seed=5, faults=faults)
    assert np.array_equal(first.values, second.values)
    assert np.array_equal(first.anomaly, second.anomaly) and first.faults == second.faults
    assert not np.array_equal(first.values, simulate(1000, seed=6, faults=faults).values)


def test_simulate_labels_the_union_of_fault_rows() -> None:
    faults = [FaultSpec("level_shift", 100.0, 50.0), FaultSpec("spike", 400.0, 100.0)]
    data = simulate(1000, seed=2, faults=faults, period_s=2.0)
    assert data.anomaly.dtype == np.int8 and data.channels == CHANNELS
    assert [(start, stop) for _, start, stop in data.faults] == [(50, 75), (200, 250)]
    assert data.anomaly[50:75].all()
    assert 1 <= data.anomaly[200:250].sum() <= 3  # only the spiked rows
    assert data.anomaly.sum() == 25 + data.anomaly[200:250].sum()


def test_simulate_default_fault_lands_in_middle_with_default_length() -> None:
    for seed in range(5):
        data = simulate(2000, seed=seed, faults=[FaultSpec("stuck")])
        ((_, start, stop),) = data.faults
        assert stop - start == 100  # 5 % of the series
        assert start >= 200 and stop <= 1800
    ((_, start, stop),) = simulate(200, seed=0, faults=[FaultSpec("stuck")]).faults
    assert stop - start == 30  # at least 30 rows


def test_simulate_leaves_normal_data_unchanged_by_faults() -> None:
    clean = simulate(600, seed=4)
    faulty = simulate(600, seed=4, faults=[FaultSpec("level_shift", 100.0, 50.0)])
    assert np.array_equal(clean.values[:100], faulty.values[:100])
    assert np.array_equal(clean.values[150:], faulty.values[150:])
    assert not clean.anomaly.any()


def test_write_csv_header_timestamps_and_values(tmp_path: Path) -> None:
    data = simulate(5, seed=1, faults=[FaultSpec("level_shift", 2.0, 2.0)])
    path = tmp_path / "pump.csv"
    write_csv(path, data)
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["timestamp", *CHANNELS, "anomaly"]
    assert [r[0] for r in rows[:2]] == ["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"]
    values = np.array([[float(v) for v in r[1:-1]] for r in rows])
    np.testing.assert_allclose(values, data.values, rtol=5e-6)
    assert [int(r[-1]) for r in rows] == [0, 0, 1, 1, 0]


def test_write_csv_uses_fractional_seconds_for_subsecond_period(tmp_path: Path) -> None:
    path = tmp_path / "fast.csv"
    write_csv(path, simulate(3, seed=1, period_s=0.25))
    stamps = [line.split(",")[0] for line in path.read_text().splitlines()[1:]]
    assert stamps == [
        "2026-01-01T00:00:00.000Z",
        "2026-01-01T00:00:00.250Z",
        "2026-01-01T00:00:00.500Z",
    ]
