"""Labels teach the next model: false alarms kept as normal data, confirmed faults left out.

A pump runs a cleaning cycle every half hour (5 minutes of pressure 4 level-sd higher): normal for
the plant, unseen by the champion, which alarms at each one. The daemon's Engine plays two
pumps for 4.4 h into a real recording and event journal; the operator labels every alarm
`false_alarm`, and one real fault `confirmed`. `oteo retrain` keeps the labelled periods as
training data, and the report shows both models on them; on a fresh run of the same conditions
the retrained model raises fewer false alarms than the champion, and fewer than a model
retrained without the labels (which leaves every alarm period out, cycles included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from engine_kit import Played, play

from daemon.cli import main
from daemon.journal import FILE_NAME as JOURNAL_FILE
from daemon.journal import Journal
from daemon.model import Model
from training.fault import inject
from training.simulator import CHANNELS, reference_scales, simulate

ROWS = 16000
CYCLE_EVERY, CYCLE_ROWS = 1800, 300
PRESSURE = 4
FAULT_AT, FAULT_ROWS = 12_700, 300  # between two cycles of pump-1
SMALL = ["--hidden", "32", "--epochs", "10", "--fault-trials", "6", "--json"]


def with_cycles(values: np.ndarray, first: int = 600) -> np.ndarray:
    out = values.copy()
    level = reference_scales()[0][PRESSURE]
    for start in range(first, len(out), CYCLE_EVERY):
        out[start : start + CYCLE_ROWS, PRESSURE] += 4.0 * level
    return out


def cycle_starts(events: list[dict[str, Any]]) -> int:
    return sum(e["kind"] == "start" for e in events)


def retrain(store: Path, model: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ("retrain", "--store", str(store), "--model", str(model), "--out", str(out))
    result = CliRunner().invoke(main, [*args, *SMALL, *extra])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def champion(train_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data import from_array
    from training.simulator import simulate_runs

    table = from_array(simulate_runs(6000, seed=1, runs=2).values, 1.0, channels=CHANNELS)
    out = tmp_path_factory.mktemp("champion") / "pump.onnx"
    # No warm-up: with it the champion raises 26 alarm starts instead of 29 (its trailing windows
    # learn each pump's first 300 s), and the challenger, trained on the periods it did not mark,
    # misses the one confirmed fault of this set-up (measured; the retrain scorecard itself
    # replays without the warm-up).
    options = {"new_level_s": 0.0, "warmup_s": 0.0}
    train_tiny(out, table=table, epochs=10, hidden=32, options=options)
    return out


@pytest.fixture(scope="module")
def labelled(champion: Path, tmp_path_factory: pytest.TempPathFactory) -> Played:
    """Two pumps with cleaning cycles, recorded; each alarm labelled as an operator would."""
    state = tmp_path_factory.mktemp("cycles")
    series = [with_cycles(simulate(ROWS, seed=seed).values) for seed in (11, 12)]
    series[0], _ = inject(
        series[0], "level_shift", FAULT_AT, FAULT_ROWS, np.random.default_rng(5), channels=[0]
    )
    played = play(Model.load(champion), series, state, time.time() - ROWS - 60)
    journal = Journal(state / JOURNAL_FILE)
    fault_ts = played.t0 + FAULT_AT
    for episode in journal.episodes(limit=1000):
        real = episode.stream == "pump-1" and (
            episode.started_ts <= fault_ts + FAULT_ROWS and (episode.ended_ts or np.inf) >= fault_ts
        )
        if real:
            journal.label(episode.event_id, "confirmed", cause="flow meter fault", by="test")
        else:
            journal.label(episode.event_id, "false_alarm", by="test")
    journal.close()
    return played


def test_labelled_false_alarms_are_learnt_and_fall_on_a_fresh_run(
    champion: Path, labelled: Played, tmp_path: Path
) -> None:
    assert labelled.store is not None
    starts = cycle_starts(labelled.events)
    assert starts >= 10, "the champion should alarm on (most) cleaning cycles"

    report = retrain(labelled.store, champion, tmp_path / "with.onnx")
    unlabelled = retrain(labelled.store, champion, tmp_path / "without.onnx", "--no-labels")
    data = report["data"]
    assert data["labels"] == str(labelled.store.parent / JOURNAL_FILE)
    assert data["labelled_false_alarms"] >= 10 and data["labelled_confirmed"] == 1
    # The labelled periods are training data now: far fewer rows are left out.
    assert data["excluded_rows"] < unlabelled["data"]["excluded_rows"] / 2
    champ, chall = report["champion"]["labelled"], report["challenger"]["labelled"]
    assert champ["false_alarm_periods"] == data["labelled_false_alarms"]
    assert chall["false_alarm_events"] < champ["false_alarm_events"]
    assert chall["confirmed_detected"] >= champ["confirmed_detected"] == 1
    assert unlabelled["data"]["labelled_false_alarms"] == 0

    # A fresh run of the same conditions (another pump, other seed): false alarms fall.
    fresh = [with_cycles(simulate(ROWS // 2, seed=31).values, first=300)]
    counts = {
        name: cycle_starts(play(Model.load(path), fresh, None, time.time()).events)
        for name, path in (
            ("champion", champion),
            ("retrained with labels", tmp_path / "with.onnx"),
            ("retrained without labels", tmp_path / "without.onnx"),
        )
    }
    cycles = len(range(300, ROWS // 2, CYCLE_EVERY))
    print(f"alarm starts on a fresh run with {cycles} cleaning cycles:", counts)
    assert counts["retrained with labels"] < counts["champion"]
    assert counts["retrained with labels"] < counts["retrained without labels"]
