"""First contact with the trainer's commands: each problem said once, bad files exit 78.

`oteo run` and `oteo inspect` refuse a bad model file with one `error:` line and exit code 78;
`oteo evaluate` and `oteo train` do the same for model, data and config files. Usage errors (a
missing argument) stay click's, exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import EXIT_CONFIG, EXIT_USAGE, main
from daemon.model import Model
from training.simulator import simulate_runs, write_csv

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"


def oteo_process(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real `oteo` console script: its own process, so its log output is the user's."""
    script = Path(sys.executable).with_name("oteo")
    return subprocess.run(
        [str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_training_says_each_warning_once(tmp_path: Path) -> None:
    # 300 rows (5 min): too little held-back data to confirm the false-alarm target, a warning.
    write_csv(tmp_path / "short.csv", simulate_runs(300, 1, 1, []))
    out = tmp_path / "short.onnx"
    result = oteo_process(
        "train", "short.csv", "--out", out, "--epochs", 2, "--no-report", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    warnings = Model.load(out).manifest.calibration.warnings
    assert warnings, "the short recording drew no warning: the test checks nothing"
    for warning in warnings:
        assert said.count(warning) == 1, f"said {said.count(warning)} times: {warning}\n{said}"
        assert f"warning: {warning}" in result.stdout
    assert said.count(f"wrote {out}") == 1, said


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evaluate") / "labelled.csv"
    write_csv(path, simulate_runs(200, 2, 1, []))
    return path


def garbage(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("missing_model", "error: {tmp}/absent.onnx: cannot read model file"),
        ("garbage_model", "error: {tmp}/garbage.onnx: "),
        ("missing_data", "error: {tmp}/absent.csv: no such file"),
        ("garbage_data", "error: garbage.csv: cannot read as CSV"),
        ("missing_config", "error: {tmp}/absent.toml: "),
    ],
)
def test_evaluate_refuses_bad_files_with_one_line_and_exit_78(
    tmp_path: Path, labelled_csv: Path, case: str, error: str
) -> None:
    model, data, extra = DEMO_MODEL, labelled_csv, []
    if case == "missing_model":
        model = tmp_path / "absent.onnx"
    elif case == "garbage_model":
        model = garbage(tmp_path, "garbage.onnx")
    elif case == "missing_data":
        data = tmp_path / "absent.csv"
    elif case == "garbage_data":
        data = garbage(tmp_path, "garbage.csv")
    else:
        extra = ["--config", str(tmp_path / "absent.toml")]
    result = CliRunner().invoke(main, ["evaluate", str(model), str(data), *extra])
    assert result.exit_code == EXIT_CONFIG, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(error.format(tmp=tmp_path)), lines[0]


def test_evaluate_usage_errors_stay_exit_2(labelled_csv: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", str(DEMO_MODEL)])
    assert result.exit_code == EXIT_USAGE
    assert "Missing argument 'DATA'" in result.stderr


def test_train_refuses_a_missing_data_file_with_exit_78(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", str(tmp_path / "absent.csv")])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert result.stderr == f"error: {tmp_path}/absent.csv: no such file\n"
