"""The committed demo model flags every fault kind on simulated data and stays quiet on normal data.

Runs of the pump build the demo model was trained on, with other seeds (runs it never saw), go
through the daemon's own alarm logic (`causal_decisions` replays the manifest's policy). Faults
last 10 minutes, except a stuck sensor: it only shows once the process moves away from the frozen
value, so it is tested on the flow sensor (which follows the pump's set point, changed every 3-30
minutes) for an hour. A stuck temperature sensor can stay unseen for longer: temperatures move
slowly, and a frozen one looks like a calm afternoon.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.model import Model
from training.data import from_array
from training.evaluate import causal_decisions, metrics
from training.fault import FAULT_KINDS, FaultSpec, inject
from training.simulator import CHANNELS, simulate

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo.onnx"
ROWS = 4 * 3600
SEEDS = (101, 102, 103)


@pytest.fixture(scope="module")
def demo() -> Model:
    return Model.load(DEMO)


def run(model: Model, seed: int, faults: list[FaultSpec]) -> dict[str, float | None]:
    data = simulate(ROWS, seed, [f for f in faults if f.kind != "stuck"])
    values, anomaly = data.values, data.anomaly.astype(bool)
    for f in faults:
        if f.kind == "stuck":
            flow = CHANNELS.index("flow_m3_h")
            rng = np.random.default_rng(seed)
            start, length = int(f.start_s or 0), int(f.duration_s or 0)
            values, mask = inject(values, "stuck", start, length, rng, channels=[flow])
            anomaly |= mask
    table = from_array(values, 1.0, channels=data.channels)
    _, alarm = causal_decisions(model, table, model.manifest.alarm)
    return metrics(alarm, anomaly, 1.0, tolerance_rows=model.window)


def test_demo_model_matches_the_simulator(demo: Model) -> None:
    assert demo.manifest.channels == CHANNELS
    assert demo.manifest.sample_period_s == 1.0


def test_demo_model_is_quiet_on_normal_runs(demo: Model) -> None:
    false_events = [run(demo, seed, [])["false_events"] for seed in SEEDS]
    assert false_events == [0] * len(SEEDS), f"false alarm events per 4 h run: {false_events}"


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_demo_model_flags_each_fault_kind(demo: Model, kind: str) -> None:
    duration = 3600.0 if kind == "stuck" else 600.0
    results = [
        run(demo, seed, [FaultSpec(kind, start_s=ROWS / 2, duration_s=duration)]) for seed in SEEDS
    ]
    detected = [r["detected_events"] for r in results]
    true = [r["true_events"] for r in results]
    false = [r["false_events"] for r in results]
    delays = [r["mean_delay_s"] for r in results]
    assert detected == true, f"{kind}: detected {detected} of {true}; delays {delays}"
    assert false == [0] * len(SEEDS), f"{kind}: false events {false}"
    assert np.all(np.array(true) >= 1)
