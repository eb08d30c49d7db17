"""From data to a calibrated file and back: small-data calibration and the CLI round trip.

`oteo simulate` -> `oteo train` -> `oteo evaluate`, through the same `oteo` entry point users run
(`daemon.cli.main`, with the trainer's commands loaded from the `oteo.commands` entry points).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from daemon.cli import EXIT_CONFIG, main
from daemon.model import Model
from training.config import ModelConfig, TrainOptions, options_for
from training.data import SensorTable, from_array, windows
from training.export import PARITY_RTOL, ScoringGraph
from training.pipeline import TrainResult, graph_scores, standardisation
from training.preset import PRESETS
from training.simulator import CHANNELS, simulate

Trainer = Callable[..., TrainResult]  # the conftest's `train_tiny`

CSV_ROWS = 3000
FAULT_ROWS = (1500, 1800)  # level_shift@1500+300 at 1 s per row


def oteo(*args: str | Path, exit_code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, f"oteo {' '.join(map(str, args))}: {result.output}"
    return result


def strict_json(text: str) -> Any:
    """Parse RFC 8259 JSON: NaN and Infinity, which Python writes by default, are refused."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- calibration on very little data ----------------------------------------------------------


@pytest.fixture(scope="module")
def skab_sized(train_tiny: Trainer, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """400 rows, as in one SKAB experiment: 65 held-back windows, too few to calibrate on."""
    table = from_array(simulate(400, seed=3).values, 1.0, channels=CHANNELS)
    return train_tiny(tmp_path_factory.mktemp("skab") / "skab.onnx", table=table, epochs=2)


def test_little_data_calibrates_on_cross_fitted_scores(skab_sized: TrainResult) -> None:
    cal = skab_sized.manifest.calibration
    assert cal.cross_fitted is True
    # Out-of-fold scores cover all 400 rows, not only the 80-row tail (65 windows).
    assert cal.windows > 65
    assert Model.load(skab_sized.path).manifest.calibration.cross_fitted is True


def test_fold_scores_in_torch_match_the_exported_graph(
    skab_sized: TrainResult, tiny_table: SensorTable
) -> None:
    """Cross-fit folds are scored in torch, not exported: that is safe only within parity."""
    m = skab_sized.manifest
    graph = ScoringGraph(skab_sized.fit.model, np.array(m.channel_mean), np.array(m.channel_scale))
    x, _ = windows(tiny_table, m.window, 7)
    torch_scores = graph_scores(graph, x)
    ort = Model.load(skab_sized.path).run(x)
    np.testing.assert_allclose(torch_scores.score, ort.score, rtol=PARITY_RTOL)
    np.testing.assert_allclose(torch_scores.channel, ort.channel_score, rtol=PARITY_RTOL)


def test_little_data_thresholds_are_finite_and_enter_is_not_below_exit(
    skab_sized: TrainResult,
) -> None:
    alarm = skab_sized.manifest.alarm
    assert math.isfinite(alarm.enter_threshold) and math.isfinite(alarm.exit_threshold)
    assert alarm.enter_threshold >= alarm.exit_threshold > 0


# --- the CLI round trip -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def normal_csv(workdir: Path) -> Path:
    path = workdir / "normal.csv"
    oteo("simulate", "--csv", path, "--rows", CSV_ROWS, "--seed", 1)
    return path


@pytest.fixture(scope="module")
def labelled_csv(workdir: Path) -> Path:
    path = workdir / "labelled.csv"
    fault = f"level_shift@{FAULT_ROWS[0]}+{FAULT_ROWS[1] - FAULT_ROWS[0]}"
    oteo("simulate", "--csv", path, "--rows", CSV_ROWS, "--seed", 2, "--fault", fault)
    return path


@pytest.fixture(scope="module")
def trained(normal_csv: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "m.onnx"
    result = oteo(
        "train", normal_csv, "--out", out, "--window", 16, "--epochs", 3, "--json", "--no-report"
    )
    return strict_json(result.stdout)


def test_simulate_writes_a_csv_with_one_row_per_sample(normal_csv: Path) -> None:
    with normal_csv.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["timestamp", *CHANNELS, "anomaly"]
    assert len(rows) == CSV_ROWS + 1


def test_simulated_fault_is_labelled_where_asked(labelled_csv: Path) -> None:
    with labelled_csv.open() as fh:
        labels = [int(r["anomaly"]) for r in csv.DictReader(fh)]
    start, stop = FAULT_ROWS
    assert labels[start:stop] == [1] * (stop - start)
    assert sum(labels) == stop - start


def test_train_json_summary_describes_the_written_file(trained: dict[str, Any]) -> None:
    path = Path(trained["path"])
    model = Model.load(path)
    m = model.manifest
    assert m.window == 16 and m.channels == CHANNELS
    assert trained["enter_threshold"] == m.alarm.enter_threshold
    assert trained["exit_threshold"] == m.alarm.exit_threshold
    assert trained["rule"] == m.calibration.rule
    assert trained["report"] is None
    assert not path.with_suffix(".report").exists()
    assert 1 <= trained["epochs"] <= 3
    assert trained["parity_max_rel_error"] == m.validation.parity_max_rel_error
    assert m.provenance.source == "normal.csv" and m.provenance.rows == CSV_ROWS


@pytest.fixture(scope="module")
def evaluated(trained: dict[str, Any], labelled_csv: Path, workdir: Path) -> dict[str, Any]:
    out_dir = workdir / "eval"
    result = oteo("evaluate", trained["path"], labelled_csv, "--json", "--out", out_dir)
    return {"metrics": json.loads(result.stdout), "dir": out_dir}


def test_evaluate_json_has_pointwise_metrics(evaluated: dict[str, Any]) -> None:
    metrics = evaluated["metrics"]
    for key in ("f1", "far", "mar"):
        assert math.isfinite(metrics[key])
    assert 0.0 <= metrics["f1"] <= 1.0
    assert 0.0 <= metrics["far"] <= 100.0 and 0.0 <= metrics["mar"] <= 100.0
    assert metrics["true_events"] == 1
    assert metrics["tp"] + metrics["fn"] == FAULT_ROWS[1] - FAULT_ROWS[0]
    assert sum(metrics[k] for k in ("tp", "fp", "fn", "tn")) == CSV_ROWS


def test_evaluate_writes_one_decision_per_input_row(evaluated: dict[str, Any]) -> None:
    with (evaluated["dir"] / "decisions.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["timestamp", "score", "alarm"]
    assert len(rows) == CSV_ROWS + 1
    assert {r[2] for r in rows[1:]} <= {"0", "1"}
    # The first rows have no complete window yet: no score; every later row has one.
    assert all(r[1] == "" for r in rows[1:16]) and all(r[1] != "" for r in rows[16:])


def test_evaluate_writes_the_score_plot(evaluated: dict[str, Any]) -> None:
    plot = evaluated["dir"] / "score.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_json_is_strict_json_when_nothing_is_detected(
    trained: dict[str, Any], normal_csv: Path
) -> None:
    # No labelled fault: no detection delay to average. Other tools (jq, JavaScript, Go) must
    # still parse the output, so the delay cannot be printed as a bare NaN.
    result = oteo("evaluate", trained["path"], normal_csv, "--json")
    metrics = strict_json(result.stdout)
    assert metrics["true_events"] == 0


def test_evaluate_applies_the_daemon_configs_alarm_overrides(
    trained: dict[str, Any], labelled_csv: Path, workdir: Path
) -> None:
    """`--config`: the same [alarm] overrides the daemon would apply (here: a threshold no window
    reaches, so nothing is flagged, unlike without the config)."""
    config = workdir / "evaluate.toml"
    config.write_text(
        f'[model]\npath = "{trained["path"]}"\n\n'
        "[alarm]\nenter_threshold = 1e30\nexit_threshold = 1e29\n",
        encoding="utf-8",
    )
    plain = strict_json(oteo("evaluate", trained["path"], labelled_csv, "--json").stdout)
    result = oteo("evaluate", trained["path"], labelled_csv, "--json", "--config", config)
    overridden = strict_json(result.stdout)
    assert plain["tp"] + plain["fp"] > 0
    assert overridden["tp"] + overridden["fp"] == 0


def test_evaluate_without_label_column_fails_with_one_error_line(
    trained: dict[str, Any], labelled_csv: Path, workdir: Path
) -> None:
    unlabelled = workdir / "unlabelled.csv"
    with labelled_csv.open() as src, unlabelled.open("w", newline="") as dst:
        csv.writer(dst).writerows(row[:-1] for row in csv.reader(src))  # drop `anomaly`
    result = oteo("evaluate", trained["path"], unlabelled, "--json", exit_code=EXIT_CONFIG)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "anomaly" in lines[0]


def test_train_with_report_writes_the_report_page(normal_csv: Path, workdir: Path) -> None:
    out = workdir / "reported.onnx"
    result = oteo("train", normal_csv, "--out", out, "--window", 16, "--epochs", 1, "--json")
    page = Path(json.loads(result.stdout)["report"])
    assert page == out.with_suffix(".report") / "index.html"
    assert page.is_file() and "<html" in page.read_text().lower()


# --- presets ------------------------------------------------------------------------------------


def test_small_preset_sets_the_small_data_regime_and_explicit_values_win() -> None:
    small = options_for("small", 8)
    assert (
        small.scale_floor
        == PRESETS["small"].values["scale_floor"]
        > TrainOptions(model=small.model).scale_floor
    )
    assert small.margin == PRESETS["small"].values["margin"]
    assert small.smoothing_alpha == PRESETS["small"].values["smoothing_alpha"]
    mine = options_for("small", 8, window=64, margin=2.0, max_epochs=5)
    assert (mine.model.window, mine.margin, mine.fit.max_epochs) == (64, 2.0, 5)
    assert mine.scale_floor == small.scale_floor
    assert options_for("default", 8) == TrainOptions(model=ModelConfig(channels=8))
    with pytest.raises(ValueError, match="unknown training setting 'windw'"):
        options_for("small", 8, windw=64)
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        options_for("tiny", 8)


def test_skab_benchmark_runs_the_small_preset() -> None:
    from training.bench.skab import PRESET, Settings

    assert PRESET == "small"
    ours = Settings().train_options(8, "x")
    assert ours == options_for("small", 8, name="x", progress=False)


def test_train_preset_small_reaches_the_model_file_and_flags_still_win(workdir: Path) -> None:
    short = workdir / "short.csv"
    oteo("simulate", "--csv", short, "--rows", 400, "--seed", 4)
    out = workdir / "small.onnx"
    args = ("--preset", "small", "--window", 16, "--epochs", 2, "--no-report", "--json")
    oteo("train", short, "--out", out, *args, "--margin", 2.0)
    m = Model.load(out).manifest
    assert m.window == 16  # given on the command line
    assert m.calibration.parameters["margin"] == 2.0  # given
    assert m.alarm.smoothing_alpha == PRESETS["small"].values["smoothing_alpha"]  # from preset
    assert m.calibration.cross_fitted is True


def test_scale_floor_widens_a_channel_that_barely_moved_in_training() -> None:
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(0.0, 1.0, 400), 80.0 + rng.normal(0.0, 0.01, 400)])
    table = from_array(values, 1.0, channels=["vibration", "temperature"])
    _, plain = standardisation(table, [(0, 400)])
    _, floored = standardisation(table, [(0, 400)], floor=5e-3)
    assert floored[0] == plain[0]  # a channel that moves keeps its own spread
    assert floored[1] == pytest.approx(0.4, rel=1e-3) and plain[1] < 0.1


def test_no_heldback_window_without_cross_fitting_is_a_clear_error(
    train_tiny: Trainer, tmp_path: Path
) -> None:
    table = from_array(simulate(150, seed=5).values, 1.0, channels=CHANNELS)
    with pytest.raises(ValueError, match="no complete window of 64 samples"):
        train_tiny(tmp_path / "x.onnx", table=table, cross_fit=False, window=64)


def test_the_warm_up_reaches_the_model_file_and_only_a_gross_fault_is_judged_during_it(
    tiny_model_path: Path,
) -> None:
    """The trainer's warm-up defaults in the manifest; the exported model's own replay judges the
    first 300 s only against 6 x its thresholds: a moderate fault there goes unjudged (the same
    stages without a warm-up catch it), a gross one alarms (a silent warm-up would hide it), and
    a fault after the warm-up alarms."""
    from dataclasses import replace

    from daemon.detector import Stages
    from training.evaluate import decide_rows

    model = Model.load(tiny_model_path)
    d = model.manifest.detection
    assert d is not None and (d.warmup_s, d.warmup_factor) == (300.0, 6.0)
    assert d.baseline_learns_accepted
    stages = Stages.of(model.manifest)

    def alarm(shift_sd: float, update: dict[str, Any] | None = None) -> np.ndarray:
        values = simulate(3000, seed=5).values
        sd = values[:, 0].std()
        values[100:250, 0] += shift_sd * sd  # a level shift of channel 0 inside the warm-up
        values[2000:2300, 0] += 8 * sd  # and one after it
        table = from_array(values, 1.0, channels=CHANNELS)
        changed = replace(stages, detection=d.model_copy(update=update or {}))
        return decide_rows(model, table, stages=changed).alarm

    warm, cold = alarm(5.0), alarm(5.0, {"warmup_s": None})
    assert cold[100:300].any() and not warm[:300].any()
    assert warm[2000:2330].any() and cold[2000:2330].any()
    gross, silent = alarm(20.0), alarm(20.0, {"warmup_factor": 0.0})
    assert gross[100:300].any() and not silent[:300].any()
