"""A partition's checkpoint file: what it holds, what comes back, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scorer_stub import StubScorer, stub_for
from test_engine import feed, make_engine

from daemon.checkpoint import Checkpoint, FileWriter
from training.simulator import MachineSimulator


def _model() -> tuple[StubScorer, np.ndarray]:
    rows = MachineSimulator(seed=5).step(200)
    return stub_for(rows, [f"ch{i}" for i in range(rows.shape[1])]), rows


def test_a_checkpoint_brings_back_window_detector_and_baselines(tmp_path: Path) -> None:
    model, rows = _model()
    engine, _, _, _ = make_engine(model, tmp_path)
    feed(engine, "a", rows[:100])
    stream = engine.streams["a"]
    cp = Checkpoint(tmp_path / "partitions", 3, 8, "sha")
    cp.write([stream])
    cp.write_moving([stream])
    saved = Checkpoint(tmp_path / "partitions", 3, 8, "sha").read()
    assert not saved.clean and list(saved.streams) == ["a"]
    doc = saved.streams["a"]
    assert doc["window"]["last_seq"] == 99 and doc["last_ts"] == 99.0
    assert doc["detector"] == json.loads(json.dumps(stream.detector.snapshot()))
    cp.write([], clean=True, unacked=3)  # streams written before are kept
    saved = cp.read()
    assert saved.clean and saved.unacked == 3 and list(saved.streams) == ["a"]
    assert '"a":' not in cp.render([], tracked={})  # no longer tracked (evicted): left out


def test_a_checkpoint_of_another_model_or_count_starts_cold(tmp_path: Path) -> None:
    model, rows = _model()
    engine, _, _, _ = make_engine(model, tmp_path)
    feed(engine, "a", rows[:40])
    Checkpoint(tmp_path, 0, 8, "sha").write([engine.streams["a"]])
    assert Checkpoint(tmp_path, 0, 8, "other").read().streams == {}
    assert Checkpoint(tmp_path, 0, 16, "sha").read().streams == {}


def test_no_file_is_a_clean_start_and_a_corrupt_one_an_unclean_one(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path, 0, 8, "sha")
    assert cp.read().clean
    cp.path.write_text("{not json")
    saved = cp.read()
    assert not saved.clean and saved.streams == {}


def test_the_writer_writes_in_order_and_says_how_each_write_went(tmp_path: Path) -> None:
    writer = FileWriter()
    results: list[tuple[str, bool]] = []
    writer.submit(tmp_path / "a.json", lambda: "1", lambda ok: results.append(("a1", ok)))
    writer.submit(tmp_path / "a.json", lambda: "2", lambda ok: results.append(("a2", ok)))
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "b.json"  # a directory that is a file: cannot be written
    writer.submit(bad, lambda: "x", lambda ok: results.append(("b", ok)))
    writer.flush()
    assert results == [("a1", True), ("a2", True), ("b", False)]
    assert (tmp_path / "a.json").read_text() == "2"
    writer.close()
