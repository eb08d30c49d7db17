"""The drift signal covers the last hour of windows, whatever their rate."""

from __future__ import annotations

import pytest

from daemon.drift import DriftMeter


def test_share_of_windows_above_p99_over_the_last_hour() -> None:
    meter = DriftMeter()
    for minute in range(60):
        meter.add(minute * 60.0, windows=100, above=1 if minute < 30 else 9)
    assert meter.ratio(59 * 60.0) == pytest.approx((30 * 1 + 30 * 9) / 6000)


def test_windows_older_than_an_hour_are_forgotten() -> None:
    meter = DriftMeter()
    meter.add(0.0, windows=1000, above=1000)  # a bad minute long ago
    for minute in range(61, 121):
        meter.add(minute * 60.0, windows=10, above=0)
    assert meter.ratio(120 * 60.0) == 0.0


def test_rate_does_not_change_the_time_span() -> None:
    slow, fast = DriftMeter(), DriftMeter()
    for second in range(0, 7200, 10):
        above = second >= 3600
        slow.add(float(second), windows=1, above=int(above))
        fast.add(float(second), windows=50, above=50 * int(above))
    # An EWMA per window would forget 50x faster for the fast stream; a time window does not.
    assert slow.ratio(7199.0) == pytest.approx(fast.ratio(7199.0))
    assert slow.ratio(7199.0) > 0.95


def test_idle_hour_reads_zero_and_reset_forgets() -> None:
    meter = DriftMeter()
    meter.add(10.0, windows=5, above=5)
    assert meter.ratio(20.0) == 1.0
    assert meter.ratio(10.0 + 3601.0 + 60.0) == 0.0
    meter.add(5000.0, windows=5, above=5)
    meter.reset()
    assert meter.ratio(5000.0) == 0.0


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_engine_exports_the_share_above_p99_and_a_new_model_starts_afresh(tmp_path) -> None:
    import numpy as np
    from scorer_stub import StubScorer, stub_for

    from daemon.config import load_config
    from daemon.engine import Engine
    from daemon.intake import Work, new_layout
    from daemon.metrics import Metrics
    from daemon.reading import ParsedReading
    from training.simulator import MachineSimulator

    model = stub_for(MachineSimulator(seed=4).step(2000))
    cfg = load_config(None, {"model.path": str(tmp_path / "m.onnx"), "state_dir": str(tmp_path)})
    metrics, clock = Metrics(), _Clock()
    engine = Engine(model, cfg, lambda out: None, metrics, clock=clock)
    layout = new_layout(model.manifest.channels)
    rows = MachineSimulator(seed=5).step(600)
    shifted = rows + 50 * np.array(model.manifest.channel_scale)  # far from anything normal

    def feed(values: np.ndarray, t0: float) -> float:
        for i in range(0, len(values), 10):
            chunk = values[i : i + 10]
            readings = [ParsedReading(t0 + i + j, None, v) for j, v in enumerate(chunk)]
            engine.handle(Work("s", readings, layout, size=len(readings)))
            engine.score_pending()
            clock.now += 10.0
            engine.tick()
        return metrics.registry.get_sample_value("oteo_drift_windows_above_p99_ratio") or 0.0

    normal = feed(rows[:300], 0.0)
    drifted = feed(shifted[300:], 300.0)
    print(f"drift ratio: normal {normal:.3f}, drifted {drifted:.3f}")
    assert normal < 0.1  # normal windows score about 1, below the stub's p99 of 2
    assert drifted > 0.4  # half of the hour's windows are far above p99
    engine.use_model(StubScorer(model.manifest))
    engine.tick()
    assert metrics.registry.get_sample_value("oteo_drift_windows_above_p99_ratio") == 0.0
