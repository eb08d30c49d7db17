"""The benchmark harness: every window scorer through the one shared function, and
`oteo benchmark suite` end to end on a tiny synthetic datasets folder (no real data needed).

The suite runs the product's defaults; here the "default" preset is shrunk in-process (a
16-sample window, 2 epochs) so that the plumbing is tested in seconds, not detection quality.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from training.bench import benchmark
from training.bench.baseline import Pca, RandomScore
from training.bench.detection import alarm_policy, detect, evidence, same_policy
from training.bench.scorer import Autoencoder, calibration_plan, count_windows
from training.bench.suite import ROWS
from training.config import options_for
from training.data import from_array
from training.preset import PRESETS, Preset

TINY = {"window": 16, "hidden": 16, "code_size": 4, "max_epochs": 2}


def coupled(rows: int, seed: int = 0, channels: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.sin(np.arange(rows) / 5.0)
    return np.column_stack([base * (c + 1) for c in range(channels)]) + 0.05 * rng.standard_normal(
        (rows, channels)
    )


@pytest.mark.parametrize("rows", [400, 2500], ids=["cross-fitted", "held-back"])
def test_the_shared_calibration_reproduces_the_trainers_policy(rows: int, tmp_path: Path) -> None:
    table = from_array(coupled(rows), 1.0)
    opts = options_for("default", 2, progress=False, name="m", **TINY)
    fitted = Autoencoder().fit(table, opts, tmp_path)
    assert fitted.manifest_policy is not None
    policy, _, _ = alarm_policy(evidence(fitted, table, opts), opts)
    # Baselines are calibrated by this function: it must give the product's own thresholds.
    assert same_policy(policy, fitted.manifest_policy)
    assert fitted.cross_fitted == (rows == 400)


@pytest.mark.parametrize("scorer", [Autoencoder(), Pca(), RandomScore()], ids=lambda s: s.name)
def test_every_scorer_meets_the_same_contract(scorer: object, tmp_path: Path) -> None:
    table = from_array(coupled(600), 1.0)
    opts = options_for("default", 2, progress=False, name="m", **TINY)
    fitted = scorer.fit(table, opts, tmp_path)  # type: ignore[attr-defined]
    plan = calibration_plan(table, opts)
    held = [n for _, h in plan.folds for n in count_windows(h, 16, 1) if n]
    assert [len(s) for s in fitted.calibration] == held
    assert all(
        np.isfinite(s.score).all() and np.isfinite(s.channel).all() for s in fitted.calibration
    )
    assert all(
        s.newest is not None and s.newest.shape == s.channel.shape for s in fitted.calibration
    )
    x = np.stack([coupled(16, seed=i) for i in range(5)]).astype(np.float32)
    out = fitted.model.run(x)
    assert out.score.shape == (5,) and out.channel_score.shape == (5, 2)
    found = detect(evidence(fitted, from_array(coupled(900, seed=1), 1.0), opts), opts)
    assert found.rows.alarm.shape == (900,) and np.isnan(found.rows.score[:15]).all()


def test_decisions_of_every_scorer_never_depend_on_later_rows(tmp_path: Path) -> None:
    opts = options_for("default", 2, progress=False, name="m", **TINY)
    train = from_array(coupled(600), 1.0)
    clean = coupled(900, seed=2)
    broken = clean.copy()
    broken[700:] *= -5.0
    for scorer in (Autoencoder(), Pca(), RandomScore()):
        fitted = [scorer.fit(train, opts, tmp_path) for _ in range(2)]
        a = detect(evidence(fitted[0], from_array(clean, 1.0), opts), opts).rows
        b = detect(evidence(fitted[1], from_array(broken, 1.0), opts), opts).rows
        np.testing.assert_array_equal(a.score[:700], b.score[:700])
        np.testing.assert_array_equal(a.alarm[:700], b.alarm[:700])


def write_datasets(root: Path) -> Path:
    """skab/valve1 (2 experiments), nab/ (2 series) and smap_msl/ (a tarball, 2 channels)."""
    rng = np.random.default_rng(0)
    valve1 = root / "skab" / "valve1"
    valve1.mkdir(parents=True)
    for k in range(2):
        values = coupled(700, seed=k, channels=3)
        values[500:600, 1] += 3.0
        stamps = np.datetime64("2020-03-09T10:14:33") + np.arange(700).astype("timedelta64[s]")
        lines = ["datetime;a;b;c;anomaly;changepoint"]
        for i in range(700):
            a, b, c = values[i]
            lines.append(
                f"{str(stamps[i]).replace('T', ' ')};{a:.5f};{b:.5f};{c:.5f};"
                f"{int(500 <= i < 600)};{int(i in (500, 600))}"
            )
        (valve1 / f"{k}.csv").write_text("\n".join(lines) + "\n")
    nab = root / "nab"
    (nab / "data" / "synthetic").mkdir(parents=True)
    (nab / "labels").mkdir()
    windows = {}
    for k in range(2):
        stamps = np.datetime64("2024-01-01T00:00") + (300 * np.arange(1200)).astype(
            "timedelta64[s]"
        )
        value = np.sin(np.arange(1200) / 12.0) + 0.05 * rng.standard_normal(1200)
        value[900:950] += 4.0
        text = ["timestamp,value"]
        text += [f"{str(s).replace('T', ' ')},{v:.5f}" for s, v in zip(stamps, value, strict=True)]
        name = f"synthetic/series_{k}.csv"
        (nab / "data" / name).write_text("\n".join(text) + "\n")
        first, last = (str(stamps[i]).replace("T", " ") + ".000000" for i in (880, 980))
        windows[name] = [[first, last]]
    (nab / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    layout = root / "scratch" / "SMAP_MSL"
    for part in ("train", "test"):
        (layout / part).mkdir(parents=True)
    for chan in ("A-1", "P-1"):
        train = np.zeros((700, 3))
        train[:, 0] = np.sin(np.arange(700) / 6)
        test = np.zeros((900, 3))
        test[:, 0] = np.sin(np.arange(900) / 6)
        test[500:560, 0] += 4.0
        np.save(layout / "train" / f"{chan}.npy", train)
        np.save(layout / "test" / f"{chan}.npy", test)
    (layout / "labeled_anomalies.csv").write_text(
        "chan_id,spacecraft,anomaly_sequences,class,num_values\n"
        'A-1,MSL,"[[500, 559]]",[point],900\n'
        'P-1,SMAP,"[[500, 559]]",[point],900\n'
    )
    (root / "smap_msl").mkdir()
    with tarfile.open(root / "smap_msl" / "smap_msl_dev.tar.gz", "w:gz") as archive:
        archive.add(layout, arcname="SMAP_MSL")
    return root


@pytest.fixture
def tiny_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "default", Preset("tiny, for tests", TINY))


@pytest.mark.usefixtures("tiny_default")
def test_suite_prints_one_table_with_every_column_and_the_noise_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = write_datasets(tmp_path / "datasets")
    result = CliRunner().invoke(benchmark, ["suite", str(data), "--seed", "0", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[1].split()
    assert header[:4] == ["set", "oteo", "pca", "random"] and "sd" in header
    body = lines[2:-1]
    assert len(body) == len(ROWS)
    for (_, _, label), line in zip(ROWS, body, strict=True):
        assert label in line
        # oteo, pca, random, the product's sd and its range
        assert len(line.split()) >= len(label.split()) + 5
    assert "[seed 1] SMAP/MSL dev oteo: done" in result.stderr


@pytest.mark.usefixtures("tiny_default")
def test_suite_json_has_every_number_of_every_set_and_writes_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = write_datasets(tmp_path / "datasets")
    out = tmp_path / "out"
    saved = tmp_path / "suite.json"
    args = ["suite", str(data), "--json", "--out", str(out), "--detectors", "oteo,pca"]
    result = CliRunner().invoke(benchmark, [*args, "--save", str(saved)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert json.loads(saved.read_text()) == summary
    assert summary["seeds"] == [0]
    for set_, key, _ in ROWS:
        row = summary["table"][set_][key]
        assert set(row) == {"oteo", "pca"}
        assert all(np.isfinite(v) for v in row.values())
    assert 0 <= summary["table"]["smap"]["precision"]["oteo"] <= 1
    assert summary["details"]["oteo"]["0"]["smap"]["channels"] == 2
    assert (out / "skab" / "oteo" / "seed-0" / "0.csv").is_file()
    assert (out / "skab" / "oteo" / "seed-0" / "0.png").is_file()
    assert not (out / "skab" / "pca" / "seed-0" / "0.png").exists()
    assert (out / "nab" / "pca" / "seed-0" / "synthetic" / "series_1.csv").is_file()
    assert (out / "smap" / "oteo" / "seed-0" / "P-1" / "decisions.csv").is_file()


def test_suite_refuses_an_unknown_set_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(benchmark, ["suite", str(tmp_path), "--sets", "skab,yahoo"])
    assert result.exit_code == 2 and "choose from skab, nab, smap" in result.output
