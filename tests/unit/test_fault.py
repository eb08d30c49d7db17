"""Fault specs, the `all` schedule, and the behaviour of each injected fault kind."""

import itertools

import numpy as np
import pytest

from training.fault import FAULT_KINDS, FaultSpec, inject, parse_fault, parse_faults, schedule_all


def noisy(rows: int = 2000, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Gaussian noise around different offsets, with channel std 1, 2, 3, ..."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, channels + 1)
    return 50.0 * scale + rng.standard_normal((rows, channels)) * scale


def test_parse_fault_bare_kind() -> None:
    assert parse_fault("spike") == FaultSpec(kind="spike")


def test_parse_fault_with_start_only() -> None:
    assert parse_fault("level_shift@60") == FaultSpec(kind="level_shift", start_s=60.0)


def test_parse_fault_with_stream_start_and_duration() -> None:
    spec = parse_fault("sim-7:level_shift@60+30")
    assert spec == FaultSpec(kind="level_shift", start_s=60.0, duration_s=30.0, stream="sim-7")


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("spik", "'spik'"),
        ("spike@soon", "'soon'"),
        ("spike@10+-5", "'-5'"),
        ("spike@10+0", "'0'"),
        ("spike@inf", "'inf'"),
        (":spike", "empty stream"),
        ("all", "'all'"),
    ],
)
def test_bad_fault_spec_names_the_problem(text: str, bad_part: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_fault(text)
    message = str(excinfo.value)
    assert bad_part in message
    assert "correlation_break" in message  # the valid kinds are listed
    assert "\n" not in message


def test_parse_faults_expands_all_with_stream_and_duration() -> None:
    specs = parse_faults(["sim-2:all+20", "spike@5"], total_s=3600.0)
    assert [s.kind for s in specs] == [*FAULT_KINDS, "spike"]
    assert all(s.stream == "sim-2" and s.duration_s == 20.0 for s in specs[:-1])
    assert specs[-1] == FaultSpec(kind="spike", start_s=5.0)


def test_schedule_all_covers_every_kind_without_overlap() -> None:
    total_s = 7200.0
    specs = schedule_all(total_s)
    assert sorted(s.kind for s in specs) == sorted(FAULT_KINDS)
    spans = sorted((s.start_s, s.start_s + s.duration_s) for s in specs)  # type: ignore[operator]
    assert spans[0][0] >= 0.1 * total_s and spans[-1][1] <= 0.9 * total_s
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)]
    assert min(gaps) > 0.02 * total_s  # real stretches of normal data between faults


def test_schedule_all_rejects_a_duration_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        schedule_all(600.0, duration_s=90.0)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_inject_returns_copy_and_mask_within_range(kind: str) -> None:
    values = noisy()
    original = values.copy()
    out, mask = inject(values, kind, 500, 200, np.random.default_rng(1))
    assert np.array_equal(values, original)
    assert out.shape == values.shape and mask.shape == (len(values),) and mask.dtype == bool
    assert mask.any() and not mask[:500].any() and not mask[700:].any()
    changed_rows = np.flatnonzero((out != values).any(axis=1))
    assert changed_rows.size > 0 and set(changed_rows) <= set(np.flatnonzero(mask))


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize(("rows", "start", "length"), [(1, 0, 5), (50, 40, 100), (50, -10, 15)])
def test_inject_clips_range_to_array(kind: str, rows: int, start: int, length: int) -> None:
    out, mask = inject(noisy(rows, 1), kind, start, length, np.random.default_rng(2))
    expected = np.zeros(rows, dtype=bool)
    expected[max(start, 0) : start + length] = True
    assert out.shape == (rows, 1) and np.isfinite(out).all()
    assert not (mask & ~expected).any()


def test_inject_outside_the_array_changes_nothing() -> None:
    values = noisy(100)
    out, mask = inject(values, "level_shift", 100, 50, np.random.default_rng(3))
    assert np.array_equal(out, values) and not mask.any()


def test_inject_picks_one_or_two_channels_when_none_given() -> None:
    values = noisy(300, 5)
    counts = set()
    for seed in range(20):
        out, _ = inject(values, "level_shift", 100, 50, np.random.default_rng(seed))
        counts.add(int((out != values).any(axis=0).sum()))
    assert counts == {1, 2}


def test_level_shift_is_relative_to_channel_scale() -> None:
    values = noisy()
    small, _ = inject(values, "level_shift", 500, 200, np.random.default_rng(4), channels=[1])
    large, _ = inject(values * 1000, "level_shift", 500, 200, np.random.default_rng(4), [1])
    np.testing.assert_allclose(large - values * 1000, (small - values) * 1000, atol=1e-6)


def test_level_shift_is_three_to_four_channel_std() -> None:
    values = noisy()
    out, _ = inject(values, "level_shift", 500, 200, np.random.default_rng(5), channels=[2])
    shift = np.abs(out[500:700, 2] - values[500:700, 2])
    assert np.ptp(shift) < 1e-9 and 2.8 < shift[0] / values[:, 2].std() < 4.2


def test_spike_labels_only_a_few_large_samples() -> None:
    values = noisy()
    out, mask = inject(values, "spike", 500, 200, np.random.default_rng(6), channels=[0])
    jump = np.abs(out[mask, 0] - values[mask, 0]) / values[:, 0].std()
    assert 1 <= mask.sum() <= 3 and (jump > 5.5).all() and (jump < 10.5).all()


def test_drift_ramps_from_zero_to_about_five_std() -> None:
    values = noisy()
    out, _ = inject(values, "drift", 500, 200, np.random.default_rng(7), channels=[0])
    ramp = np.abs(out[500:700, 0] - values[500:700, 0]) / values[:, 0].std()
    assert ramp[0] < 0.1 and 4.3 < ramp[-1] < 5.7 and (np.diff(ramp) > 0).all()


def test_stuck_removes_noise() -> None:
    values = noisy()
    out, _ = inject(values, "stuck", 500, 200, np.random.default_rng(8), channels=[1])
    assert np.all(out[500:700, 1] == values[500, 1])


def test_noise_burst_multiplies_noise_five_to_eight_times() -> None:
    values = noisy()
    out, _ = inject(values, "noise_burst", 500, 400, np.random.default_rng(9), channels=[0])
    ratio = out[500:900, 0].std() / values[:, 0].std()
    assert 4.5 < ratio < 8.5
    assert abs(out[500:900, 0].mean() - values[:, 0].mean()) < 1.5  # noise, not a shift


def test_correlation_break_keeps_range_but_stops_following_load() -> None:
    rng = np.random.default_rng(10)
    load = np.repeat(rng.uniform(0.0, 10.0, size=10), 200)  # ten operating points
    values = np.column_stack([load, 2.0 * load + 5.0]) + 0.1 * rng.standard_normal((2000, 2))
    out, _ = inject(values, "correlation_break", 1010, 150, np.random.default_rng(11), [1])
    broken = out[1010:1160, 1]
    assert values[:, 1].min() <= broken.min() and broken.max() <= values[:, 1].max()
    residual = np.abs(broken - (2.0 * out[1010:1160, 0] + 5.0))
    assert residual.mean() > 10 * 0.1 * np.sqrt(5)  # far beyond the coupled noise level


def test_inject_rejects_unknown_kind_and_bad_channel() -> None:
    with pytest.raises(ValueError, match="kind"):
        inject(noisy(), "meltdown", 0, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="out of range"):
        inject(noisy(channels=2), "spike", 0, 10, np.random.default_rng(0), channels=[2])
