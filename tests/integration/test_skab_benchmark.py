"""`oteo benchmark skab` on the real SKAB data in ../shared/datasets (never copied into the repo).

Tests that need the data skip, saying so, when the folder is missing (set OTEO_DATASETS to the
folder that holds skab/ to point them elsewhere); the causality test runs on synthetic rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from daemon.cli import main
from training.bench.changepoint import pooled
from training.bench.skab import (
    TRAIN_ROWS,
    Settings,
    SkabFile,
    find_files,
    run_file,
    score_predictions,
)

DATASETS = Path(
    os.environ.get("OTEO_DATASETS", Path(__file__).parents[2].parent / "shared/datasets")
)
SKAB = DATASETS / "skab"
CONV_AE = SKAB / "published/Conv_AE/valve1"
# A tiny model: these tests check the protocol, not detection quality.
TINY = ["--window", "16", "--hidden", "16", "--code-size", "4", "--epochs", "3"]


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"SKAB data not found at {path} (set OTEO_DATASETS to the datasets folder)")
    return path


def test_published_conv_ae_predictions_score_as_published() -> None:
    files, skipped = find_files(need(SKAB / "valve1"))
    assert len(files) == 16 and not skipped
    m = pooled(score_predictions(files, need(CONV_AE)))
    # ../shared/datasets/README.md: Conv-AE on valve1 0.75 / 14.40 / 31.84 / 20.90.
    assert round(m["f1"], 2) == 0.75
    assert round(m["far"], 2) == 14.40
    assert round(m["mar"], 2) == 31.84
    assert round(m["changepoint_standard"], 2) == 20.90


def test_benchmark_on_two_valve1_files_prints_the_pooled_table_and_writes_predictions(
    tmp_path: Path,
) -> None:
    valve1 = need(SKAB / "valve1")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("0.csv", "1.csv"):
        (data / name).symlink_to(valve1 / name)  # a link, not a copy: SKAB is GPL-3.0
    (data / "notes.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["benchmark", "skab", str(data), "--json", "--out", str(out), *TINY]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("f1", "far", "mar", "missed_changepoints", "false_changepoints", "seconds"):
        assert key in summary
    assert summary["files"] == 2
    assert summary["skipped"] == [["notes.csv", "no anomaly, changepoint, datetime column"]]
    assert 0 <= summary["f1"] <= 1 and 0 <= summary["far"] <= 100 and 0 <= summary["mar"] <= 100
    for profile in ("standard", "low_fp", "low_fn"):
        assert -100 <= summary[f"changepoint_{profile}"] <= 100
    assert 0 <= summary["missed_changepoints"] <= summary["changepoints"] == 8
    assert "[2/2] 1.csv" in result.stderr
    files, _ = find_files(data)
    for f in files:
        written = (out / f.name).read_text().splitlines()
        assert written[0] == "datetime;anomaly_pred"
        rows = [line.split(";") for line in written[1:]]
        # Rows 400..end in file order, one 0/1 prediction each: the published layout.
        assert [d for d, _ in rows] == f.datetimes[TRAIN_ROWS:]
        assert {p for _, p in rows} <= {"0", "1"}
        assert (out / f.name).with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Anyone can re-score the written predictions: the same numbers come back.
    rescored = pooled(score_predictions(files, out))
    assert round(rescored["f1"], 4) == summary["f1"] and round(rescored["far"], 4) == summary["far"]


def synthetic(rows: int = 700, seed: int = 0) -> SkabFile:
    """Two coupled noisy channels at 1 Hz, labels all zero."""
    rng = np.random.default_rng(seed)
    base = np.sin(np.arange(rows) / 9.0)
    values = np.column_stack([base, 0.5 * base]) + 0.1 * rng.standard_normal((rows, 2))
    t = 1.6e9 + np.arange(rows, dtype=np.float64)
    zeros = np.zeros(rows, dtype=np.int8)
    return SkabFile("s.csv", [str(x) for x in t], t, values, ["a", "b"], zeros, zeros.copy())


def test_decisions_never_depend_on_later_rows(tmp_path: Path) -> None:
    """Training sees rows 0..399 only and each decision only rows up to its own."""
    clean = synthetic()
    broken = synthetic()
    cut = 550
    broken.values[cut:] += 50.0  # a huge fault from row 550 on
    settings = Settings(window=16, hidden=16, code_size=4, epochs=3)
    a = run_file(clean, settings, tmp_path)
    b = run_file(broken, settings, tmp_path)
    assert a.policy == b.policy
    np.testing.assert_array_equal(a.score[:cut], b.score[:cut])
    np.testing.assert_array_equal(a.alarm[:cut], b.alarm[:cut])
    assert b.alarm[cut + 16 :].all()


def test_preset_default_is_what_oteo_train_does_and_small_stays_the_default() -> None:
    from training.config import options_for

    default = Settings(preset="default", seed=3).train_options(8, "f")
    assert default == options_for("default", 8, seed=3, progress=False, name="f")
    assert Settings().train_options(8, "f") == options_for("small", 8, progress=False, name="f")
    # Options given on top of a preset win, as in `oteo train --preset small --window 64`.
    assert Settings(preset="default", window=16).train_options(8, "f").model.window == 16
