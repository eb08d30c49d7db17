"""Shared fixtures: tiny models trained and exported through the real pipeline, once per session.

The models are deliberately small (window 16, hidden 16, code 4, three epochs on 3000 simulated
rows) so that every test module, including the daemon's, can load a real exported file in
seconds. Their quality means nothing; their files obey the contract like any other.
The trainer is imported inside the fixtures, so an edge install without torch can still collect
the daemon's tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from host_program import SBIN

# Debian installs mosquitto and ip in /usr/sbin, not on a normal user's PATH: the tests (and the
# programs they start) find them there.
_PATH = os.environ.get("PATH", "").split(os.pathsep)
os.environ["PATH"] = os.pathsep.join([*_PATH, *(d for d in SBIN if d not in _PATH)])

if TYPE_CHECKING:
    from training.data import SensorTable
    from training.pipeline import TrainResult

TINY_ROWS = 3000
TINY_WINDOW = 16
TINY_HIDDEN = 16
TINY_CODE = 4
TINY_EPOCHS = 3
TINY_SEED = 0

Trainer = Callable[..., "TrainResult"]  # (out, *, table=None, seed=0, epochs=3, **model)


@pytest.fixture(scope="session", autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A daemon started without `state_dir` keeps its outbox under a temporary XDG_STATE_HOME.

    The default is ~/.local/state/oteo/{instance}: shared by every test run on the machine.
    """
    saved = {name: os.environ.pop(name, None) for name in ("XDG_STATE_HOME", "STATE_DIRECTORY")}
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_table() -> SensorTable:
    """3000 rows (50 min at 1 Hz) of the simulated pump: enough for held-back calibration."""
    from training.data import from_array
    from training.simulator import CHANNELS, simulate

    return from_array(simulate(TINY_ROWS, seed=1).values, 1.0, channels=CHANNELS)


@pytest.fixture(scope="session")
def train_tiny(tiny_table: SensorTable) -> Trainer:
    """Train and export a tiny model with `training.pipeline.train`; returns its TrainResult.

    Keyword arguments: `table`, `seed`, `epochs`, `cross_fit`, `options` (TrainOptions fields) and
    any ModelConfig field (`architecture`, `variant`, `noise`, `hashing`, ...). Same arguments,
    same model.
    """
    from training.config import FitConfig, ModelConfig, TrainOptions
    from training.pipeline import train

    def run(
        out: Path,
        *,
        table: SensorTable | None = None,
        seed: int = TINY_SEED,
        epochs: int = TINY_EPOCHS,
        cross_fit: bool | None = None,
        options: dict[str, Any] | None = None,
        **model: Any,
    ) -> TrainResult:
        table = tiny_table if table is None else table
        settings: dict[str, Any] = {
            "window": TINY_WINDOW,
            "hidden": TINY_HIDDEN,
            "code_size": TINY_CODE,
            **model,
        }
        opts = TrainOptions(
            model=ModelConfig(channels=len(table.channels), **settings),
            fit=FitConfig(max_epochs=epochs, seed=seed, progress=False),
            name=out.stem,
            cross_fit=cross_fit,
            **(options or {}),
        )
        return train(table, opts, out)

    return run


@pytest.fixture(scope="session")
def tiny_train_result(train_tiny: Trainer, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The TrainResult of the tiny dense denoising model (its torch model is in `.fit.model`)."""
    return train_tiny(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_model_path(tiny_train_result: TrainResult) -> Path:
    """A real exported .onnx file: dense, denoising, window 16 x 8 channels, code 4."""
    return tiny_train_result.path


@pytest.fixture(scope="session")
def tiny_hash_model_path(train_tiny: Trainer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `tiny_model_path`, trained for hashing (sigmoid code; code > 0.5 gives hash bits)."""
    result = train_tiny(tmp_path_factory.mktemp("tiny-hash") / "tiny-hash.onnx", hashing=True)
    return result.path


@pytest.fixture(scope="session")
def tiny_windows() -> np.ndarray:
    """96 raw-unit windows [96, 16, 8] float32 of normal data the tiny models never saw."""
    from training.simulator import simulate

    values = simulate(96 + TINY_WINDOW - 1, seed=2).values.astype(np.float32)
    view = np.lib.stride_tricks.sliding_window_view(values, TINY_WINDOW, axis=0)
    return np.ascontiguousarray(view.transpose(0, 2, 1))
