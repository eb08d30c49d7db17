"""Channel roles and constant channels through real training, export and onnxruntime.

A synthetic machine: two coupled sensors, a rare 0/1 command, a set point with three levels and
a channel that never moves. Tiny models (window 16, 3 epochs): their quality means nothing, the
contract they obey does.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from daemon.cli import main
from daemon.model import Model
from training.config import options_for
from training.data import SensorTable, from_array, windows
from training.export import PARITY_RTOL, ExportError, ScoringGraph, check_parity, difference
from training.pipeline import TrainResult, train

ROWS = 3000
WINDOW = 16
CHANNELS = ["s1", "s2", "cmd", "mode", "flat"]
TINY = {"window": WINDOW, "hidden": 16, "code_size": 4, "max_epochs": 3}


def machine(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    s1 = np.sin(t / 25) + 0.1 * rng.standard_normal(rows)
    s2 = 2 * s1 + 5 + 0.1 * rng.standard_normal(rows)
    cmd = (rng.random(rows) < 0.02).astype(np.float64)
    mode = np.repeat(np.resize([40.0, 55.0, 70.0], rows // 300 + 1), 300)[:rows]
    return np.c_[s1, s2, cmd, mode, np.full(rows, 3.3)]


@pytest.fixture(scope="module")
def table() -> SensorTable:
    return from_array(machine(), 1.0, channels=CHANNELS)


@pytest.fixture(scope="module")
def trained(table: SensorTable, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Train once per set of options: trained(**settings) -> TrainResult."""
    cache: dict[str, TrainResult] = {}
    folder = tmp_path_factory.mktemp("roles")

    def run(data: SensorTable | None = None, **settings: Any) -> TrainResult:
        data = table if data is None else data
        key = json.dumps([data.channels, sorted(settings.items())], default=str)
        if key not in cache:
            opts = options_for("default", len(data.channels), progress=False, **TINY, **settings)
            cache[key] = train(data, opts, folder / f"m{len(cache)}.onnx")
        return cache[key]

    return run


def probe_windows(values: np.ndarray | None = None) -> np.ndarray:
    values = machine(400, seed=5) if values is None else values
    x, _ = windows(from_array(values, 1.0, channels=CHANNELS), WINDOW, 7)
    return x


def torch_outputs(result: TrainResult, x: np.ndarray) -> list[np.ndarray]:
    m = result.manifest
    graph = ScoringGraph(
        result.fit.model, np.asarray(m.channel_mean), np.asarray(m.channel_scale), m.roles
    ).eval()
    with torch.no_grad():
        return [t.numpy() for t in graph(torch.from_numpy(x))]


def test_binary_and_few_valued_channels_are_detected_and_written_to_the_manifest(
    trained: Any,
) -> None:
    result = trained()
    assert result.manifest.roles == ["target", "target", "ignore", "ignore", "target"]
    assert any("cmd, mode" in n and "not scored" in n for n in result.notes)
    assert any("flat" in n and "scale floored" in n for n in result.notes)
    assert Model.load(result.path).manifest.roles == result.manifest.roles


@pytest.mark.parametrize(
    "settings",
    [{}, {"discrete_role": "context"}, {"targets": ("s2",)}, {"predict_steps": 4}],
    ids=["ignore", "context", "one-target", "predict-newest"],
)
def test_exported_scores_match_torch_and_cover_target_channels_only(
    trained: Any, settings: dict[str, Any]
) -> None:
    result = trained(**settings)
    m = result.manifest
    x = probe_windows()
    got = Model.load(result.path).run(x)
    score, channel_score, reconstruction, code = torch_outputs(result, x)
    np.testing.assert_allclose(got.score, score, rtol=PARITY_RTOL)
    np.testing.assert_allclose(got.channel_score, channel_score, rtol=PARITY_RTOL, atol=1e-12)
    np.testing.assert_allclose(got.code, code, rtol=1e-4, atol=1e-5)
    targets = m.target_indices()
    others = [i for i in range(len(CHANNELS)) if i not in targets]
    np.testing.assert_allclose(got.score, got.channel_score[:, targets].mean(1), rtol=1e-6)
    assert (got.channel_score[:, others] == 0).all()
    # Channels the model does not rebuild come back as they went in.
    np.testing.assert_allclose(got.reconstruction[..., others], x[..., others], rtol=1e-6)
    assert got.reconstruction.shape == x.shape
    np.testing.assert_allclose(got.reconstruction, reconstruction, rtol=1e-5, atol=1e-5)


def test_an_ignored_channel_never_changes_an_output_and_a_context_channel_does(
    trained: Any,
) -> None:
    x = probe_windows()
    changed = x.copy()
    changed[..., 2] = 1.0 - changed[..., 2]  # every command flipped
    ignored = Model.load(trained().path)
    a, b = ignored.run(x), ignored.run(changed)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.code, b.code)
    context = Model.load(trained(discrete_role="context").path)
    assert not np.array_equal(context.run(x).score, context.run(changed).score)


def test_context_channels_are_scaled_to_their_range_not_their_std(trained: Any) -> None:
    m = trained(discrete_role="context").manifest
    assert (m.channel_mean[2], m.channel_scale[2]) == (0.0, 1.0)  # the 0/1 command as is
    assert (m.channel_mean[3], m.channel_scale[3]) == (40.0, 30.0)  # set point 40..70 -> 0..1
    assert m.channel_scale[0] == pytest.approx(np.std(machine()[:, 0]), rel=0.1)  # a target


def test_predicting_the_newest_steps_hides_them_from_the_model(trained: Any) -> None:
    """The graph masks the newest steps of the targets: the model predicts them from history."""
    model = Model.load(trained(predict_steps=4).path)
    x = probe_windows()
    changed = x.copy()
    changed[:, -4:, 0] += 3.0  # the newest steps of a target, far from normal
    before, after = model.run(x), model.run(changed)
    np.testing.assert_array_equal(before.reconstruction[:, -4:, 0], after.reconstruction[:, -4:, 0])
    assert (after.channel_score[:, 0] > 10 * before.channel_score[:, 0]).all()


# --- constant channels ----------------------------------------------------------------------


def spacecraft(rows: int = ROWS, seed: int = 1) -> SensorTable:
    """NASA T-5 in small: telemetry constant at -1 throughout training, beside 0/1 commands."""
    rng = np.random.default_rng(seed)
    commands = (rng.random((rows, 4)) < 0.05).astype(np.float64)
    return from_array(np.c_[np.full(rows, -1.0), commands], 1.0, channels=["c0", *"abcd"])


def test_a_constant_target_channel_trains_exports_and_alarms_when_it_moves(trained: Any) -> None:
    result = trained(spacecraft())
    m = result.manifest
    assert m.roles == ["target", "ignore", "ignore", "ignore", "ignore"]
    assert m.validation.parity_max_rel_error <= PARITY_RTOL
    assert any("c0" in n and "scale floored" in n for n in result.notes)
    model = Model.load(result.path)
    x = np.tile(spacecraft(WINDOW, seed=9).values[None], (2, 1, 1))
    x[1, -3:, 0] = 1.0  # the telemetry flips, as it does in the test array
    score = model.run(x).score
    assert score[0] < m.alarm.enter_threshold < score[1]


def test_a_constant_channel_among_scored_sensors_trains_and_exports(trained: Any) -> None:
    result = trained(discrete_role="target")  # every channel scored, `flat` included
    assert result.manifest.roles == ["target"] * 5
    assert result.manifest.validation.parity_max_rel_error <= PARITY_RTOL


@pytest.mark.parametrize("data", ["constant-target", "machine"])
def test_the_parity_check_still_catches_a_wrong_graph(trained: Any, data: str) -> None:
    result = trained(spacecraft()) if data == "constant-target" else trained()
    m = result.manifest
    session = Model.load(result.path).session
    mean, scale = np.asarray(m.channel_mean), np.asarray(m.channel_scale)
    probe = (
        spacecraft(200, seed=4)
        if data == "constant-target"
        else from_array(machine(200, seed=4), 1.0, channels=CHANNELS)
    )
    x, _ = windows(probe, WINDOW, 3)
    check_parity(ScoringGraph(result.fit.model, mean, scale, m.roles).eval(), session, x)
    wrong = copy.deepcopy(result.fit.model)
    with torch.no_grad():
        for p in wrong.parameters():
            p.mul_(1.001)  # weights off by 0.1 %
    with pytest.raises(ExportError, match="differ"):
        check_parity(ScoringGraph(wrong, mean, scale, m.roles).eval(), session, x)


# --- the command line -----------------------------------------------------------------------


def oteo(*args: str | Path, exit_code: int = 0) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, f"oteo {' '.join(map(str, args))}: {result.output}"
    return result


@pytest.fixture(scope="module")
def machine_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "machine.csv"
    values = machine(1500)
    lines = ["timestamp," + ",".join(CHANNELS)]
    lines += [f"{1.7e9 + i}," + ",".join(f"{v:.6g}" for v in row) for i, row in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_takes_roles_from_the_command_line_and_inspect_shows_them(
    machine_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    tiny = ["--window", "16", "--hidden", "16", "--code-size", "4", "--epochs", "2"]
    roles = ["--targets", "s1,s2", "--context", "cmd", "--ignore", "mode,flat"]
    oteo("train", machine_csv, "--out", out, "--no-report", "--json", *tiny, *roles)
    shown = oteo("inspect", out).output
    assert "roles target s1, s2; context cmd; ignore mode, flat" in shown
    assert json.loads(oteo("inspect", out, "--json").output)["manifest"]["roles"] == [
        "target",
        "target",
        "context",
        "ignore",
        "ignore",
    ]


def test_train_notes_the_roles_it_chose(machine_csv: Path, tmp_path: Path) -> None:
    tiny = ["--window", "16", "--hidden", "16", "--code-size", "4", "--epochs", "2"]
    output = oteo("train", machine_csv, "--out", tmp_path / "m.onnx", "--no-report", *tiny).output
    assert "note: binary, one-hot or few-valued channel(s) cmd, mode: not used" in output


def test_an_unknown_channel_in_a_role_option_is_a_usage_error(
    machine_csv: Path, tmp_path: Path
) -> None:
    result = oteo(
        "train", machine_csv, "--out", tmp_path / "m.onnx", "--targets", "s9", exit_code=2
    )
    assert "--targets: no channel 's9'" in result.output


def test_parity_compares_scores_as_the_rms_errors_they_stand_for() -> None:
    """Scores of 9.3e-9 and 8.6e-5 2e-13 and 2.6e-9 apart (NASA T-5 and G-6, onnxruntime's
    kernels against torch) are the same RMS error to 1e-7 sd: no disagreement. Weights 0.1 %
    off move a normal window's RMS error by ~1e-3 sd: a wrong graph."""
    tiny, good, normal = np.array([9.307e-9]), np.array([8.59e-5]), np.array([0.05, 0.8, 4.0])
    assert difference("score", tiny, tiny + 2.07e-13) < PARITY_RTOL
    assert difference("score", good, good + 2.6e-9) < PARITY_RTOL
    assert difference("channel_score", good[:, None], good[:, None] + 2.6e-9) < PARITY_RTOL
    assert difference("score", normal, (np.sqrt(normal) + 1e-3) ** 2) > PARITY_RTOL
    assert difference("score", tiny, (np.sqrt(tiny) + 1e-3) ** 2) > PARITY_RTOL
    assert difference("channel_score", normal[None], normal[None] * (1 + 1e-4)) > PARITY_RTOL
    assert difference("reconstruction", normal, normal + 1e-3) > PARITY_RTOL


DATASETS = Path(
    os.environ.get("OTEO_DATASETS", Path(__file__).parents[2].parent / "shared/datasets")
)


def test_nasa_t5_with_its_telemetry_constant_in_training_trains_with_the_defaults(
    tmp_path: Path,
) -> None:
    """It stopped with `torch vs onnxruntime differ by 2.22e-05 relative` before the floor."""
    if not (DATASETS / "smap_msl").is_dir():
        pytest.skip(f"SMAP/MSL data not found at {DATASETS / 'smap_msl'} (set OTEO_DATASETS)")
    from training.bench.smap import load_array, locate

    values = load_array(locate(DATASETS / "smap_msl").folder, "train", "T-5")
    table = from_array(values, 1.0, channels=[f"c{i}" for i in range(values.shape[1])])
    assert table.constant_channels[0] == "c0"
    opts = options_for("default", values.shape[1], progress=False)
    result = train(table, opts, tmp_path / "t5.onnx")
    assert result.manifest.target_indices() == [0]
    assert result.manifest.validation.parity_max_rel_error <= PARITY_RTOL
