"""The trainer and the daemon cut the same windows from the same irregular, multi-rate readings.

One set of grid rules (daemon/grid.py): a fast channel with jitter (two values per slot: the first
wins), a channel that misses readings (held), a slow channel (held between its samples), a short
gap (interpolated) and a long one (the window restarts). The same readings go to `oteo train`'s
loader as a CSV and to the daemon's engine as per-channel messages; the windows and their scores
from a real exported model must agree.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import load_config
from daemon.engine import Engine
from daemon.intake import Work, new_layout
from daemon.messages import WindowScore
from daemon.metrics import Metrics
from daemon.model import Model, ScoreBatch
from daemon.reading import ChannelSample
from training.data import load_table, windows

CHANNELS = ["fast", "mid", "slow"]
T0 = 1_750_000_000.13  # not on a whole second: the grid is anchored at the first reading
WINDOW = 8


def readings(seconds: int, seed: int) -> list[tuple[float, int, float]]:
    """(ts, channel, value): fast at 2 Hz with jitter, mid at 1 Hz with dropouts, slow at 0.25 Hz;
    nothing at all in seconds 100 (a short gap) and 200..212 (a long one)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(seconds):
        if s == 100 or 200 <= s <= 212:
            continue
        base = np.sin(s / 9.0)
        for half in (0.0, 0.5):
            out.append((T0 + s + half + rng.uniform(-0.05, 0.05), 0, base + 0.1 * rng.normal()))
        if rng.random() > 0.1:
            out.append((T0 + s + rng.uniform(-0.2, 0.2), 1, 2 * base + 0.1 * rng.normal()))
        if s % 4 == 0:
            out.append((T0 + s + 0.02, 2, 10 + base))
    return sorted(out)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from training.config import FitConfig, ModelConfig, TrainOptions
    from training.data import from_array
    from training.pipeline import train

    t = np.arange(3000)
    base = np.sin(t / 9.0)
    values = np.stack([base, 2 * base, 10 + base], axis=1) + 0.05 * np.random.default_rng(1).normal(
        size=(3000, 3)
    )
    opts = TrainOptions(
        model=ModelConfig(channels=3, window=WINDOW, hidden=16, code_size=4),
        fit=FitConfig(max_epochs=2, progress=False),
        name="grid",
    )
    out = tmp_path_factory.mktemp("grid") / "grid.onnx"
    return Model.load(train(from_array(values, 1.0, channels=CHANNELS), opts, out).path)


class Recording:
    """The real model, keeping a copy of every window it scores."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.windows: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def run(self, batch: np.ndarray) -> ScoreBatch:
        self.windows += [w.copy() for w in batch]
        return self._model.run(batch)


def trainer_windows(items: list[tuple[float, int, float]], model: Model, tmp: Path):
    path = tmp / "readings.csv"
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["time", *CHANNELS])
        for ts, channel, value in items:
            row = [""] * 3
            row[channel] = repr(float(value))
            out.writerow([repr(float(ts)), *row])
    table = load_table(path, period_s=1.0)
    x, ends = windows(table, WINDOW)
    return x, table.timestamps[ends], model.run(x).score


def daemon_windows(items: list[tuple[float, int, float]], model: Model, tmp: Path):
    cfg = load_config(
        None,
        {"model.path": str(model.path), "state_dir": str(tmp), "topics.publish_scores": True},
    )
    scores: dict[str, float] = {}

    def sink(out: Any) -> None:
        if isinstance(out, WindowScore):
            scores[out.ts] = out.score

    recording = Recording(model)
    clock = {"now": 0.0}
    engine = Engine(recording, cfg, sink, Metrics(), clock=lambda: clock["now"])  # type: ignore[arg-type]
    layout = new_layout(CHANNELS)
    for ts, channel, value in items:
        engine.handle(Work("s", None, layout, channel, ChannelSample(ts, value)))
        clock["now"] += 0.1
    clock["now"] += 3.0  # past the aligner's wait for the last slots (not yet stale)
    engine.tick()
    engine.score_pending()
    return np.stack(recording.windows), scores


def test_trainer_and_daemon_cut_the_same_windows_and_score_them_alike(
    model: Model, tmp_path: Path
) -> None:
    from daemon.messages import format_ts

    items = readings(300, seed=4)
    x_train, ends_train, score_train = trainer_windows(items, model, tmp_path)
    x_daemon, scores_daemon = daemon_windows(items, model, tmp_path)
    assert len(x_train) > 200 and len(x_train) == len(x_daemon)
    np.testing.assert_allclose(x_daemon, x_train, rtol=1e-6, atol=1e-6)
    assert [format_ts(t) for t in ends_train] == list(scores_daemon)
    np.testing.assert_allclose(list(scores_daemon.values()), score_train, rtol=1e-5)
