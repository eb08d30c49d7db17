"""Every architecture, variant, noise kind and hashing model trains, exports and loads at the edge.

Each case goes through the real path (`training.pipeline.train`: fit, export, parity check,
calibration, reload) on a few hundred rows for one epoch, then the file is loaded by the daemon's
loader and scores finite numbers. Quality is not checked here, only that the contract holds.
Windows are 8 samples: the exporter's time grows with the window for GRU and LSTM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from daemon.model import Model
from training.config import ARCHITECTURES, NOISES, VARIANTS, ModelConfig
from training.data import SensorTable, from_array
from training.pipeline import TrainResult
from training.simulator import CHANNELS, simulate

# 300 rows: 233 training windows, 1-2 optimiser steps (GRU and LSTM are slow to train and
# export); calibration uses the 60-row held-back tail (cross-fitting would export 5 times).
ROWS = 300
WINDOW = 8
CASES = list(itertools.product(ARCHITECTURES, VARIANTS))

Trainer = Callable[..., TrainResult]  # the conftest's `train_tiny`


@pytest.fixture(scope="module")
def small_table() -> SensorTable:
    return from_array(simulate(ROWS, seed=1).values, 1.0, channels=CHANNELS)


@pytest.fixture(scope="module")
def short_windows(tiny_windows: np.ndarray) -> np.ndarray:
    """Unseen raw windows of WINDOW samples [96, 8, 8]."""
    return np.ascontiguousarray(tiny_windows[:, :WINDOW])


def train_small(train_tiny: Trainer, table: SensorTable, out: Path, **model: object) -> None:
    train_tiny(out, table=table, epochs=1, cross_fit=False, window=WINDOW, **model)


def assert_one_file_without_random_ops(path: Path) -> None:
    """The export contract: one self-contained file, deterministic graph."""
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(path.name)] == [path.name]
    assert not list(path.parent.glob("*.data")), "external data written beside the model"
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, f"{init.name} is external"
    ops = {n.op_type for n in proto.graph.node}
    ops |= {n.op_type for f in proto.functions for n in f.node}
    assert not [op for op in ops if "Random" in op], sorted(ops)


def assert_scores_finite(model: Model, windows: np.ndarray) -> None:
    out = model.run(windows)
    n = len(windows)
    assert out.score.shape == (n,)
    assert out.channel_score.shape == (n, model.channels)
    assert out.reconstruction.shape == windows.shape
    assert out.code.shape == (n, model.manifest.code_size)
    for name in ("score", "channel_score", "reconstruction", "code"):
        assert np.all(np.isfinite(getattr(out, name))), name
    assert np.all(out.score >= 0)


@pytest.mark.parametrize(("architecture", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_every_architecture_and_variant_exports_a_loadable_scoring_file(
    architecture: str,
    variant: str,
    small_table: SensorTable,
    train_tiny: Trainer,
    short_windows: np.ndarray,
    tmp_path: Path,
) -> None:
    noise = "gaussian" if variant == "denoising" else "none"
    out = tmp_path / f"{architecture}-{variant}.onnx"
    train_small(
        train_tiny, small_table, out, architecture=architecture, variant=variant, noise=noise
    )

    model = Model.load(out)
    assert (model.manifest.architecture, model.manifest.variant) == (architecture, variant)
    assert (model.window, model.channels) == (WINDOW, len(CHANNELS))
    assert_scores_finite(model, short_windows[:8])
    assert_one_file_without_random_ops(out)


@pytest.mark.parametrize("noise", [n for n in NOISES if n != "none"])
def test_every_noise_kind_trains_a_denoising_dense_model(
    noise: str,
    small_table: SensorTable,
    train_tiny: Trainer,
    short_windows: np.ndarray,
    tmp_path: Path,
) -> None:
    out = tmp_path / f"dense-{noise}.onnx"
    train_small(train_tiny, small_table, out, variant="denoising", noise=noise, noise_level=0.2)

    model = Model.load(out)
    assert (model.manifest.noise, model.manifest.noise_level) == (noise, 0.2)
    assert_scores_finite(model, short_windows[:8])
    assert_one_file_without_random_ops(out)


def test_denoising_without_noise_is_refused() -> None:
    with pytest.raises(ValueError, match="noise"):
        ModelConfig(channels=8, variant="denoising", noise="none")


def assert_hashable(path: Path, windows: np.ndarray) -> None:
    model = Model.load(path)
    m = model.manifest
    assert m.hashable is True
    assert m.validation.code_binariness is not None
    assert 0.0 <= m.validation.code_binariness <= 1.0
    code = model.run(windows).code
    assert code.shape == (len(windows), m.code_size)
    assert np.all((code >= 0.0) & (code <= 1.0))
    assert_one_file_without_random_ops(path)


def test_dense_hashing_model_has_codes_in_unit_interval(
    tiny_hash_model_path: Path, tiny_windows: np.ndarray
) -> None:
    assert_hashable(tiny_hash_model_path, tiny_windows)


def test_conv1d_hashing_model_has_codes_in_unit_interval(
    small_table: SensorTable,
    train_tiny: Trainer,
    short_windows: np.ndarray,
    tmp_path: Path,
) -> None:
    out = tmp_path / "conv1d-hash.onnx"
    train_small(train_tiny, small_table, out, architecture="conv1d", hashing=True)
    assert_hashable(out, short_windows)
    assert Model.load(out).manifest.architecture == "conv1d"


def test_plain_model_hashes_by_the_median_of_its_code(
    tiny_model_path: Path, tiny_windows: np.ndarray
) -> None:
    """Not trained for hashing: bits are code > its held-back median, about half set."""
    model = Model.load(tiny_model_path)
    m = model.manifest
    assert m.hashable is False and m.validation.code_binariness is None
    assert m.code_median is not None and len(m.code_median) == m.code_size
    cut = m.hash_cut()
    assert cut is not None and np.array_equal(cut, m.code_median)
    bits = model.run(tiny_windows).code > cut
    assert 0.2 < bits.mean() < 0.8  # normal windows: neither all set nor none
