"""Channel roles: which columns are scored, which are model inputs only, which are dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scorer_stub import make_manifest

from daemon.inspect_text import roles_line
from daemon.manifest import Manifest, ManifestError
from training.role import RoleError, assign_roles, kind_of

ROWS = 2000
RNG = np.random.default_rng(7)


def sensor() -> np.ndarray:
    return np.cumsum(RNG.standard_normal(ROWS)) + 20.0


def command(rate: float = 0.02) -> np.ndarray:
    return (RNG.random(ROWS) < rate).astype(np.float64)


def set_point(levels: tuple[float, ...] = (40.0, 55.0, 70.0)) -> np.ndarray:
    """A set point that moves every 250 rows among a few levels."""
    return np.repeat(np.resize(levels, ROWS // 250 + 1), 250)[:ROWS]


def quantised_sensor() -> np.ndarray:
    """A noisy sensor through a coarse ADC: few levels, changing at most steps (SKAB pressure)."""
    return np.round(RNG.standard_normal(ROWS) * 0.8) * 0.33


def one_hot(columns: int = 4) -> np.ndarray:
    """One-hot commands: at most one column is 1 in a row, most rows none."""
    out = np.zeros((ROWS, columns))
    on = np.flatnonzero(RNG.random(ROWS) < 0.1)
    out[on, RNG.integers(0, columns, len(on))] = 1.0
    return out


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (command(), "indicator"),
        (np.zeros(ROWS), "indicator"),  # a command never sent in training
        (np.ones(ROWS), "indicator"),
        (np.where(command(0.3) > 0, 1.0, -1.0), "discrete"),  # a binary state as +-1
        (set_point(), "discrete"),
        (quantised_sensor(), "continuous"),
        (sensor(), "continuous"),
        (np.full(ROWS, 3.3), "constant"),
    ],
    ids=[
        "command",
        "never-sent-command",
        "always-on",
        "binary-pm1",
        "set-point",
        "quantised-sensor",
        "sensor",
        "constant",
    ],
)
def test_columns_are_classified_by_what_their_rows_show(column: np.ndarray, kind: str) -> None:
    assert kind_of(column) == kind


def test_one_hot_columns_are_indicators() -> None:
    block = one_hot()
    assert {kind_of(block[:, c]) for c in range(block.shape[1])} == {"indicator"}


def test_binary_and_few_valued_columns_leave_the_score_by_default() -> None:
    values = np.c_[sensor(), sensor(), command(), set_point(), quantised_sensor()]
    roles, notes = assign_roles(["a", "b", "cmd", "sp", "p"], values)
    assert roles.roles == ("target", "target", "ignore", "ignore", "target")
    assert any("cmd, sp" in n and "ignored" in n for n in notes)


def test_discrete_role_context_keeps_them_as_model_inputs() -> None:
    values = np.c_[sensor(), command(), set_point()]
    roles, notes = assign_roles(["a", "cmd", "sp"], values, discrete_role="context")
    assert roles.roles == ("target", "context", "context")
    assert roles.inputs == [0, 1, 2] and roles.targets == [0]
    assert any("context" in n for n in notes)


def test_discrete_role_target_scores_every_channel() -> None:
    values = np.c_[sensor(), command()]
    roles, notes = assign_roles(["a", "cmd"], values, discrete_role="target")
    assert roles.every_channel_a_target and not notes


def test_named_targets_are_the_only_scored_channels() -> None:
    values = np.c_[sensor(), sensor(), command(), np.full(ROWS, 3.3)]
    roles, _ = assign_roles(["a", "b", "cmd", "flat"], values, targets=["b"])
    # The unnamed sensor and the constant one become context; the command keeps its default.
    assert roles.roles == ("context", "target", "ignore", "context")
    assert roles.target_positions == (1,)


def test_named_roles_win_over_detection() -> None:
    values = np.c_[sensor(), sensor(), command()]
    roles, _ = assign_roles(["a", "b", "cmd"], values, targets=["cmd"], context=["a"], ignore=["b"])
    assert roles.roles == ("context", "ignore", "target")
    assert roles.inputs == [0, 2] and roles.target_positions == (1,)


def test_telemetry_with_two_levels_beside_commands_stays_the_target() -> None:
    """NASA E-1: column 0 toggles between -1 and 1, columns 1..24 are commands."""
    telemetry = np.where(command(0.3) > 0, 1.0, -1.0)
    values = np.c_[telemetry, one_hot(), command()]
    roles, notes = assign_roles([f"c{i}" for i in range(6)], values)
    assert roles.roles == ("target",) + ("ignore",) * 5
    assert any("discrete one(s) as targets: c0" in n for n in notes)


def test_a_table_of_indicators_only_scores_all_of_them() -> None:
    roles, notes = assign_roles(["x", "y"], np.c_[command(), command()])
    assert roles.every_channel_a_target
    assert notes == []  # nothing was left out: nothing to say


def test_constant_telemetry_beside_commands_is_the_target() -> None:
    """NASA T-5: column 0 is -1 throughout training."""
    roles, _ = assign_roles(["c0", "c1", "c2"], np.c_[np.full(ROWS, -1.0), command(), command()])
    assert roles.roles == ("target", "ignore", "ignore")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"targets": ["nope"]}, "--targets: no channel 'nope'"),
        ({"context": ["a"], "ignore": ["a"]}, "two roles"),
        ({"context": ["a"], "ignore": ["b"]}, "no target channel"),
        ({"discrete_role": "maybe"}, "discrete_role must be one of"),
    ],
)
def test_impossible_roles_are_refused_with_one_clear_line(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises(RoleError, match=message):
        assign_roles(["a", "b"], np.c_[sensor(), sensor()], **given)  # type: ignore[arg-type]


# --- the manifest ---------------------------------------------------------------------------


def manifest(roles: list[str] | None) -> Manifest:
    base = make_manifest(["a", "b", "c"], np.zeros(3), np.ones(3))
    doc = base.model_dump()
    if roles is not None:
        doc["roles"] = roles
    return Manifest.from_json(Manifest.model_validate(doc).to_json())


def test_a_file_without_roles_has_every_channel_as_target() -> None:
    m = manifest(None)
    assert m.roles == [] and m.channel_roles() == ["target"] * 3
    assert m.target_indices() == [0, 1, 2]


def test_manifest_roles_name_the_scored_channels() -> None:
    m = manifest(["context", "target", "ignore"])
    assert m.target_indices() == [1]


@pytest.mark.parametrize(
    ("roles", "message"),
    [(["target"], "one role per channel"), (["context", "ignore", "context"], "one target")],
)
def test_manifest_refuses_roles_that_do_not_fit(roles: list[str], message: str) -> None:
    doc = make_manifest(["a", "b", "c"], np.zeros(3), np.ones(3)).model_dump()
    doc["roles"] = roles
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(json.dumps(doc))


def test_inspect_line_lists_each_role_and_shortens_long_lists() -> None:
    channels = [f"c{i}" for i in range(25)]
    line = roles_line(channels, ["target"] + ["ignore"] * 24)
    assert line == "roles target c0; ignore c1, c2, c3, c4, c5, c6, ..., c24 (24)"
    assert (
        roles_line(["a", "b"], ["target", "target"]) == "roles every channel is a target (scored)"
    )
