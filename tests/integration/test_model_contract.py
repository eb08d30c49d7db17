"""Contract 1 with real onnxruntime on really exported models (see shared/DESIGN.md).

Export->load->score parity with the torch scoring graph, batch invariance, every way a model file
is refused (one line naming the file and the problem), `oteo inspect`, an edge runtime that never
imports torch, and reproducible training for a fixed seed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import daemon
from daemon.cli import EXIT_CONFIG, main
from daemon.manifest import METADATA_KEY, Manifest
from daemon.model import OUTPUTS, Model, ModelFileError, ScoreBatch
from training.export import PARITY_RTOL, ScoringGraph
from training.pipeline import TrainResult

Trainer = Callable[..., TrainResult]  # the conftest's `train_tiny`


# --- export -> load -> score parity ---------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 64])
def test_onnxruntime_scores_match_the_torch_scoring_graph(
    tiny_train_result: TrainResult, tiny_windows: np.ndarray, batch: int
) -> None:
    m = tiny_train_result.manifest
    graph = ScoringGraph(
        tiny_train_result.fit.model,
        np.asarray(m.channel_mean, dtype=np.float32),
        np.asarray(m.channel_scale, dtype=np.float32),
    ).eval()
    windows = tiny_windows[:batch]
    with torch.no_grad():
        expected = [t.numpy() for t in graph(torch.from_numpy(windows))]

    got = Model.load(tiny_train_result.path).run(windows)

    for name, ref in zip(OUTPUTS, expected, strict=True):
        actual = getattr(got, name)
        assert actual.shape == ref.shape, name
        # score and channel_score: element by element (thresholds act on each); the others
        # relative to their largest magnitude (a code unit near 0 differs by float32 noise).
        atol = 0.0 if name in ("score", "channel_score") else PARITY_RTOL * np.abs(ref).max()
        np.testing.assert_allclose(actual, ref, rtol=PARITY_RTOL, atol=atol, err_msg=name)


# --- batch invariance -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny_model_path", "tiny_hash_model_path"])
def loaded_model(request: pytest.FixtureRequest) -> Model:
    return Model.load(request.getfixturevalue(request.param))


def row(out: ScoreBatch, i: int) -> list[np.ndarray]:
    return [getattr(out, name)[i] for name in OUTPUTS]


def test_window_outputs_are_bit_identical_in_any_batch_and_position(
    loaded_model: Model, tiny_windows: np.ndarray
) -> None:
    x = tiny_windows
    target = 5
    alone = row(loaded_model.run(x[target : target + 1]), 0)
    layouts = {
        "first of 2": (x[target : target + 2], 0),
        "second of 2": (x[[0, target]], 1),
        "third of 3": (x[[40, 41, target]], 2),
        "first of 64": (x[target : target + 64], 0),
        "sixth of 64": (x[:64], target),
        "last of 64": (np.concatenate([x[70:96], x[10:47], x[target : target + 1]]), 63),
        "sixth of 96": (x, target),
    }
    for layout, (batch, position) in layouts.items():
        got = row(loaded_model.run(batch), position)
        for name, a, b in zip(OUTPUTS, alone, got, strict=True):
            assert np.array_equal(a, b), f"{name} differs when the window is {layout}"


# --- refused model files ------------------------------------------------------------------


def assert_refused(path: Path, *fragments: str, **load_kwargs: Any) -> str:
    """Model.load raises ModelFileError with one line naming the file and the problem."""
    with pytest.raises(ModelFileError) as info:
        Model.load(path, **load_kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def manifest_of(path: Path) -> dict[str, Any]:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])


def with_manifest_text(source: Path, text: str, out: Path) -> Path:
    """Copy of `source` whose oteo manifest is replaced by `text` (graph unchanged)."""
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = text
    onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, str(out))
    return out


def with_manifest_changes(source: Path, out: Path, **changes: Any) -> Path:
    return with_manifest_text(source, json.dumps({**manifest_of(source), **changes}), out)


def test_missing_file_is_refused_with_one_line(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nowhere.onnx", "cannot read")


def test_truncated_file_is_refused_with_one_line(tiny_model_path: Path, tmp_path: Path) -> None:
    data = tiny_model_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "not a readable ONNX model")


def test_random_bytes_are_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    assert_refused(path, "not a readable ONNX model")


def test_empty_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert_refused(path)


def test_onnx_without_manifest_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(tiny_model_path))
    del proto.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save_model(proto, str(path))
    assert_refused(path, "no oteo manifest")


def test_manifest_that_is_not_json_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_text(tiny_model_path, "{window: 16", tmp_path / "garbled.onnx")
    assert_refused(path, "not valid JSON")


def test_manifest_that_is_not_an_object_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_text(tiny_model_path, "[1, 2]", tmp_path / "list.onnx")
    assert_refused(path, "JSON object")


def test_unknown_manifest_schema_version_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_changes(tiny_model_path, tmp_path / "v99.onnx", schema_version=99)
    assert_refused(path, "schema_version 99", "not supported")


def test_invalid_manifest_field_is_refused_naming_the_field(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_changes(tiny_model_path, tmp_path / "negative.onnx", window=-16)
    assert_refused(path, "manifest.window")


def test_invalid_nested_manifest_field_is_refused_naming_its_path(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    alarm = {**manifest_of(tiny_model_path)["alarm"], "k": 0}
    path = with_manifest_changes(tiny_model_path, tmp_path / "k0.onnx", alarm=alarm)
    assert_refused(path, "manifest.alarm.k")


def test_manifest_window_disagreeing_with_the_graph_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_changes(tiny_model_path, tmp_path / "w32.onnx", window=32)
    assert_refused(path, "input 'window'", "[batch, 32, 8]")


def test_manifest_channels_disagreeing_with_the_graph_are_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    m = manifest_of(tiny_model_path)
    quantiles = m["channel_score_quantiles"]
    path = with_manifest_changes(
        tiny_model_path,
        tmp_path / "c9.onnx",
        channels=[*m["channels"], "extra"],
        channel_mean=[*m["channel_mean"], 0.0],
        channel_scale=[*m["channel_scale"], 1.0],
        channel_score_quantiles={**quantiles, "values": [*quantiles["values"], [0.1, 0.2, 0.3]]},
        roles=[*m["roles"], "target"] if m.get("roles") else [],
        residual_spread=[*m["residual_spread"], 1.0] if m.get("residual_spread") else None,
    )
    assert Manifest.model_validate(manifest_of(path)).channels[-1] == "extra"  # valid on its own
    assert_refused(path, "input 'window'", "[batch, 16, 9]")


def test_manifest_code_size_disagreeing_with_the_graph_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = with_manifest_changes(tiny_model_path, tmp_path / "k8.onnx", code_size=8)
    assert_refused(path, "code")


def test_graph_producing_nan_on_warm_up_is_refused_with_one_line(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(tiny_model_path))
    # Every float weight, not one: a NaN in a hidden layer may be clipped to 0 by some ReLU
    # kernels and never reach the outputs, which would test the kernel, not the loader.
    poisoned = 0
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            weights = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full_like(weights, np.nan), init.name))
            poisoned += 1
    assert poisoned, "no float initializer to poison"
    path = tmp_path / "nan.onnx"
    onnx.save_model(proto, str(path))  # metadata_props (the manifest) are kept
    assert manifest_of(path)["window"] == 16
    assert_refused(path, "warm-up", "non-finite")


def test_sha256_pin_mismatch_is_refused_with_one_line(tiny_model_path: Path) -> None:
    assert_refused(tiny_model_path, "sha256", "pinned", expected_sha256="0" * 64)


def test_matching_sha256_pin_loads_and_reports_the_hash(tiny_model_path: Path) -> None:
    digest = hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert Model.load(tiny_model_path, expected_sha256=digest).sha256 == digest
    assert Model.load(tiny_model_path, expected_sha256=digest.upper()).sha256 == digest


# --- oteo inspect ---------------------------------------------------------------------------


def test_inspect_prints_the_manifest(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path)])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    text = result.stdout
    assert digest in text
    assert "dense / denoising" in text
    assert "window 16 samples x 8 channels" in text
    assert "motor_current_a" in text


def test_inspect_json_parses_with_sha256_of_the_file(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert doc["sha256"] == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert Manifest.model_validate(doc["manifest"]) == Model.load(tiny_model_path).manifest


@pytest.mark.parametrize("content", [b"not a model", None], ids=["garbage", "missing"])
def test_inspect_of_a_bad_file_exits_78_with_one_error_line(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == EXIT_CONFIG == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(path) in lines[0]
    assert result.stdout == ""


# --- no torch in the edge runtime -------------------------------------------------------------

DAEMON_DIR = Path(daemon.__file__).parent
FORBIDDEN = ("torch", "training")

_IMPORT_ALL_AND_INSPECT = """
import importlib, json, pkgutil, sys
import daemon
modules = [i.name for i in pkgutil.walk_packages(daemon.__path__, "daemon.")]
for name in modules:
    importlib.import_module(name)
from daemon.cli import main
main(["inspect", sys.argv[1]], standalone_mode=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training"))
print("RESULT " + json.dumps({"modules": modules, "forbidden": loaded}))
"""

_HELP = """
import json, sys
from daemon.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    code = exc.code
print("RESULT " + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def run_python(script: str, *args: str) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout
    return json.loads(lines[-1].removeprefix("RESULT ")), proc.stdout


def test_every_daemon_module_and_inspect_run_without_torch(tiny_model_path: Path) -> None:
    result, output = run_python(_IMPORT_ALL_AND_INSPECT, str(tiny_model_path))
    assert "daemon.model" in result["modules"] and "daemon.cli" in result["modules"]
    assert result["forbidden"] == []
    assert "dense / denoising" in output  # inspect really ran


def test_oteo_help_lists_trainer_commands_without_importing_torch() -> None:
    result, output = run_python(_HELP)
    assert result == {"code": 0, "torch": False}
    for command in ("train", "evaluate", "inspect", "simulate"):
        assert f"  {command}" in output, output


def test_oteo_console_script_shows_help() -> None:
    script = Path(sysconfig.get_path("scripts")) / "oteo"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "inspect"):
        assert f"  {command}" in proc.stdout, proc.stdout


def imports_of(source: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import anywhere in `source`, nested or dynamic."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return sorted(found)


def test_import_scan_sees_imports_inside_functions() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    from torch import nn\n"
        "    class A:\n"
        "        def g(self):\n"
        "            import training.fit\n"
        "    return importlib.import_module('torch.onnx')\n"
    )
    assert imports_of(source) == [(1, "os"), (3, "torch"), (6, "training"), (7, "torch")]


def test_no_daemon_source_imports_torch_or_training() -> None:
    files = sorted(DAEMON_DIR.rglob("*.py"))
    assert DAEMON_DIR / "model.py" in files
    offenders = [
        f"{path.relative_to(DAEMON_DIR.parent)}:{line} imports {name}"
        for path in files
        for line, name in imports_of(path.read_text(encoding="utf-8"))
        if name in FORBIDDEN
    ]
    assert offenders == []


# --- reproducible training ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def retrained_path(train_tiny: Trainer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained again: same data, same seed, same settings."""
    return train_tiny(tmp_path_factory.mktemp("again") / "tiny.onnx").path


def graph_bytes(path: Path) -> bytes:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]  # the manifest holds the creation time and training seconds
    return proto.SerializeToString()


def test_same_seed_and_data_give_bit_identical_scores(
    tiny_model_path: Path, retrained_path: Path, tiny_windows: np.ndarray
) -> None:
    first = Model.load(tiny_model_path).run(tiny_windows)
    again = Model.load(retrained_path).run(tiny_windows)
    for name in OUTPUTS:
        assert np.array_equal(getattr(first, name), getattr(again, name)), name


def test_same_seed_and_data_give_identical_graph_bytes(
    tiny_model_path: Path, retrained_path: Path
) -> None:
    assert graph_bytes(tiny_model_path) == graph_bytes(retrained_path)


def test_different_seed_gives_different_scores(
    train_tiny: Trainer, tiny_model_path: Path, tiny_windows: np.ndarray, tmp_path: Path
) -> None:
    other = train_tiny(tmp_path / "seed1.onnx", seed=1).path
    first = Model.load(tiny_model_path).run(tiny_windows).score
    assert not np.array_equal(first, Model.load(other).run(tiny_windows).score)
    assert Model.load(other).manifest.provenance.seed == 1
