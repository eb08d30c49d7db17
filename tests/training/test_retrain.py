"""`oteo retrain` on recorded data: a shifted normal is learnt, a fault-ridden challenger refused.

The recordings are made by the daemon's own `Engine` (real alarm logic on a real exported model)
and `Recorder` (the real store), fed in-process; tests/integration/test_retrain_daemon.py does the
same through Mosquitto and a running daemon. Every model here is really trained (small: seconds).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from engine_kit import Played, play

from daemon.cli import EXIT_CONFIG, main
from daemon.config import load_config
from daemon.intake import Work, new_layout
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.reading import ParsedReading
from daemon.recorder import Recorder
from daemon.recording import FILE_NAME
from training.fault import FAULT_KINDS, FaultSpec, inject
from training.simulator import CHANNELS, reference_scales, simulate

ROWS = 16000  # 4.4 h at 1 Hz per stream; two pumps of the build are recorded
FAULTY_ROWS = 8000  # 38 % of it inside injected faults
SHIFTED = 4  # pressure_bar: a sensor replaced with another offset
HIDDEN, EPOCHS = 32, 10
SMALL = ["--hidden", str(HIDDEN), "--epochs", str(EPOCHS), "--fault-trials", "10", "--json"]


def shift() -> np.ndarray:
    out = np.zeros(len(CHANNELS))
    out[SHIFTED] = 4.0 * reference_scales()[0][SHIFTED]
    return out


def oteo(*args: str | Path, code: int = 0) -> dict[str, Any] | str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 and "--json" in args else result.output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def champion(train_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data import from_array
    from training.simulator import simulate_runs

    table = from_array(simulate_runs(6000, seed=1, runs=2).values, 1.0, channels=CHANNELS)
    out = tmp_path_factory.mktemp("champion") / "pump.onnx"
    # A champion that never takes a lasting level for normal by itself (new_level_s 0): the
    # replaced sensor stays in alarm until a retrained model knows it.
    train_tiny(out, table=table, epochs=EPOCHS, hidden=HIDDEN, options={"new_level_s": 0.0})
    return out


@pytest.fixture(scope="module")
def shifted_recording(champion: Path, tmp_path_factory: pytest.TempPathFactory) -> Played:
    """The pump after its pressure sensor was replaced: a permanent offset, recorded."""
    state = tmp_path_factory.mktemp("shifted")
    series = [simulate(ROWS, seed=seed).values + shift() for seed in (11, 12)]
    return play(Model.load(champion), series, state, time.time() - ROWS - 60)


@pytest.fixture
def live(champion: Path, tmp_path: Path) -> Iterator[Path]:
    """The daemon's model file (a copy of the champion) and a config naming it."""
    path = tmp_path / "live" / "model.onnx"
    path.parent.mkdir()
    shutil.copy(champion, path)
    yield path


def config(tmp_path: Path, live: Path, **model: str) -> Path:
    lines = [f'state_dir = "{tmp_path / "state"}"', "[model]", f'path = "{live}"']
    lines += [f'{k} = "{v}"' for k, v in model.items()]
    path = tmp_path / "oteo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shifted_level_alarms_before_and_not_after_promote_and_a_fault_is_still_caught(
    shifted_recording: Played, live: Path, tmp_path: Path
) -> None:
    starts = [e for e in shifted_recording.events if e["kind"] == "start"]
    assert starts, "the champion should alarm on the shifted level"
    report = oteo(
        "retrain", "--store", shifted_recording.store, "--config", config(tmp_path, live), "--out",
        tmp_path / "next.onnx", "--promote", "--normal-since", shifted_recording.t0, *SMALL,
    )  # fmt: skip
    assert isinstance(report, dict)
    print("champion vs challenger:", json.dumps({k: report[k] for k in ("champion", "challenger")}))
    assert report["decision"] == "promote" and report["promoted"] is True, report["reasons"]
    assert sha256(live) == report["challenger"]["sha256"] == sha256(tmp_path / "next.onnx")
    beside = json.loads((live.parent / "model.retrain.json").read_text())
    assert beside["decision"] == "promote"
    assert (tmp_path / "next.retrain.json").is_file()
    # The champion, always in alarm on the new level, detects nothing new; the challenger does.
    assert report["champion"]["false_alarms_per_day"] > report["challenger"]["false_alarms_per_day"]
    # (10 faults per kind and tiny models: single rates are coarse, so compare kinds, not means.)
    champion_rates = report["champion"]["detection_rate"]
    better = [
        kind
        for kind, rate in report["challenger"]["detection_rate"].items()
        if rate > champion_rates[kind]
    ]
    assert len(better) >= 3, report["challenger"]["detection_rate"]

    promoted = Model.load(live)
    later = simulate(3000, seed=21).values + shift()
    quiet = play(promoted, [later], None, time.time())
    assert not [e for e in quiet.events if e["kind"] == "start"], quiet.events[:1]
    faulty, _ = inject(later, "level_shift", 1500, 300, np.random.default_rng(3), channels=[0])
    caught = play(promoted, [faulty], None, time.time())
    starts = [e for e in caught.events if e["kind"] == "start"]
    assert starts, "a real fault on the shifted stream must still raise an alarm"


def test_alarm_periods_are_left_out_so_a_permanent_shift_needs_normal_since(
    shifted_recording: Played, live: Path, tmp_path: Path
) -> None:
    out = oteo(
        "retrain", "--store", shifted_recording.store, "--model", live,
        "--out", tmp_path / "next.onnx", *SMALL, code=EXIT_CONFIG,
    )  # fmt: skip
    assert "no normal data left after leaving out alarm, muted and stale periods" in str(out)
    assert "--normal-since" in str(out)


def test_with_the_default_new_level_a_replaced_sensor_ends_its_alarm_as_a_new_normal(
    train_tiny, tmp_path: Path
) -> None:
    from training.data import from_array
    from training.simulator import simulate_runs

    table = from_array(simulate_runs(6000, seed=1, runs=2).values, 1.0, channels=CHANNELS)
    model = train_tiny(tmp_path / "pump.onnx", table=table, epochs=EPOCHS, hidden=HIDDEN).path
    series = [simulate(4000, seed=11).values + shift()]
    played = play(Model.load(model), series, None, time.time() - 4000 - 60)
    kinds = [(e["kind"], e.get("reason")) for e in played.events if e["kind"] != "update"]
    assert kinds[0] == ("start", None)
    assert ("end", "new_normal") in kinds, kinds
    end = next(e for e in played.events if e.get("reason") == "new_normal")
    assert end["duration_s"] < 800  # about half of new_level_s (800 s) of the new level


def test_promote_refuses_when_the_config_pins_sha256(
    shifted_recording: Played, live: Path, tmp_path: Path
) -> None:
    before = sha256(live)
    report = oteo(
        "retrain", "--store", shifted_recording.store,
        "--config", config(tmp_path, live, sha256=before), "--out", tmp_path / "next.onnx",
        "--promote", "--normal-since", shifted_recording.t0, *SMALL,
    )  # fmt: skip
    assert isinstance(report, dict)
    assert report["decision"] == "promote" and report["promoted"] is False
    assert report["promotion"].startswith("refused: the daemon config pins model.sha256")
    assert report["challenger"]["sha256"] in report["promotion"]
    assert sha256(live) == before
    saved = json.loads((tmp_path / "next.retrain.json").read_text())
    assert saved["promotion"] == report["promotion"]


def test_challenger_trained_on_faulty_data_is_refused_with_the_reason(
    champion: Path, live: Path, tmp_path: Path
) -> None:
    """Readings full of faults the daemon did not mark (say, alarms were overridden off)."""
    faults = [FaultSpec(kind, None, 200.0) for kind in FAULT_KINDS for _ in range(4)]
    data = simulate(FAULTY_ROWS, seed=11, faults=faults)
    assert data.anomaly.mean() > 0.3
    state = tmp_path / "faulty"
    metrics = Metrics()
    recorder = Recorder(
        load_config(None, {"model.path": str(live), "record.streams": ["*"]}).record, state, metrics
    )
    recorder.use_layout(CHANNELS, 1.0)
    t0 = time.time() - FAULTY_ROWS - 60
    for i in range(0, FAULTY_ROWS, 500):
        rows = data.values[i : i + 500]
        readings = [ParsedReading(t0 + i + j, None, v) for j, v in enumerate(rows)]
        recorder.record(Work("pump-1", readings, new_layout(CHANNELS), size=len(readings)))
        recorder.flush({})
    recorder.close()
    before = sha256(live)
    report = oteo(
        "retrain", "--store", state / FILE_NAME, "--model", live, "--out", tmp_path / "bad.onnx",
        "--promote", *SMALL,
    )  # fmt: skip
    assert isinstance(report, dict)
    print(
        "faulty data, champion vs challenger:",
        json.dumps({k: report[k] for k in ("champion", "challenger")}),
    )
    assert report["decision"] == "keep" and report["promoted"] is False
    assert any(r.startswith("detection of ") and " fell from " in r for r in report["reasons"])
    assert sha256(live) == before
    saved = json.loads((tmp_path / "bad.retrain.json").read_text())
    assert saved["reasons"] == report["reasons"]
