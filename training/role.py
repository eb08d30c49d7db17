"""Channel roles: which channels the model scores (target), only reads (context), or drops (ignore).

Named channels get the role they are given. The others are classified from their normal rows:

| kind       | what the normal rows show                                          | role         |
|------------|--------------------------------------------------------------------|--------------|
| indicator  | every value 0 or 1: a binary state, a command, a one-hot member    | discrete_role|
| discrete   | two levels; or 3..MAX_LEVELS that change at few steps (set point,  | discrete_role|
|            | operating mode)                                                    |              |
| constant   | one value other than 0 and 1 (a sensor that did not move)          | target       |
| continuous | anything else                                                      | target       |

A discrete or indicator column scored as a sensor turns every unseen command pattern or mode into
an anomaly (NASA SMAP/MSL: 24 one-hot command columns beside one telemetry value), so by default
they leave the score. A model needs at least one target: when every unnamed channel is discrete,
the non-indicator discrete ones stay targets (a telemetry value with two levels beside commands),
and when only indicators are left, all of them do. Numpy only: unit tests run without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from daemon.manifest import Role
from training.config import ROLES

Kind = Literal["indicator", "discrete", "constant", "continuous"]

# More levels than this and a column is a sensor, however rarely it changes.
MAX_LEVELS = 10
# A column with 3..MAX_LEVELS levels is a set point or a mode only if its value changes at no more
# than this share of steps: a quantised sensor (SKAB's pressure: 5-9 levels) changes at about
# half of them, a set point at a handful.
MAX_CHANGE_SHARE = 0.05


class RoleError(ValueError):
    """The roles asked for are impossible (unknown channel, named twice, no target)."""


@dataclass(frozen=True)
class ChannelRoles:
    """The role of every channel of a table, in channel order."""

    roles: tuple[Role, ...]

    @classmethod
    def all_targets(cls, channels: int) -> ChannelRoles:
        return cls(("target",) * channels)

    @property
    def every_channel_a_target(self) -> bool:
        return all(r == "target" for r in self.roles)

    @property
    def inputs(self) -> list[int]:
        """Channels the model reads (targets and context), in channel order."""
        return [i for i, r in enumerate(self.roles) if r != "ignore"]

    @property
    def targets(self) -> list[int]:
        """Channels whose reconstruction error is scored, in channel order."""
        return [i for i, r in enumerate(self.roles) if r == "target"]

    @property
    def context(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "context"]

    @property
    def target_positions(self) -> tuple[int, ...]:
        """Where the targets sit among the model's inputs."""
        inputs = self.inputs
        return tuple(inputs.index(t) for t in self.targets)

    def names(self, channels: Sequence[str], role: Role) -> list[str]:
        return [c for c, r in zip(channels, self.roles, strict=True) if r == role]


def kind_of(values: np.ndarray) -> Kind:
    """What one column's normal rows look like (see the module's table)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "continuous"
    levels = np.unique(v)
    if np.isin(levels, (0.0, 1.0)).all():
        return "indicator"
    if len(levels) == 1:
        return "constant"
    if len(levels) == 2:
        return "discrete"
    if len(levels) <= MAX_LEVELS:
        changes = float(np.mean(v[1:] != v[:-1])) if len(v) > 1 else 0.0
        if changes <= MAX_CHANGE_SHARE:
            return "discrete"
    return "continuous"


def assign_roles(
    channels: Sequence[str],
    values: np.ndarray,
    *,
    targets: Sequence[str] = (),
    context: Sequence[str] = (),
    ignore: Sequence[str] = (),
    discrete_role: str = "ignore",
) -> tuple[ChannelRoles, list[str]]:
    """Roles for `channels` from normal rows `values` [T, C]; and notes saying what was decided.

    Named channels keep their role. Unnamed ones: continuous and constant channels are targets,
    indicator and discrete ones get `discrete_role`; when `targets` are named, those are the only
    scored channels and the unnamed ones are context (or ignored, if discrete_role is ignore).
    """
    if discrete_role not in ROLES:
        raise RoleError(f"discrete_role must be one of {ROLES}, not {discrete_role!r}")
    named: dict[str, Role] = {}
    for role, names in (("target", targets), ("context", context), ("ignore", ignore)):
        for name in names:
            if name not in channels:
                raise RoleError(
                    f"--{'targets' if role == 'target' else role}: no channel {name!r}; "
                    f"channels: {', '.join(channels)}"
                )
            if name in named and named[name] != role:
                raise RoleError(f"channel {name!r} is given two roles: {named[name]} and {role}")
            named[name] = role  # type: ignore[assignment]
    kinds = {c: kind_of(values[:, i]) for i, c in enumerate(channels) if c not in named}
    roles: dict[str, Role] = dict(named)
    for c, kind in kinds.items():
        discrete = kind in ("indicator", "discrete")
        if targets:  # the named targets are the only scored channels
            roles[c] = "ignore" if discrete and discrete_role == "ignore" else "context"
        else:
            roles[c] = discrete_role if discrete else "target"  # type: ignore[assignment]
    notes: list[str] = []
    taken = [c for c, k in kinds.items() if k in ("indicator", "discrete")]
    if "target" not in roles.values():
        # Promote the least command-like columns: discrete telemetry before indicators.
        for level in ("discrete", "indicator"):
            if promoted := [c for c, k in kinds.items() if k == level]:
                roles.update(dict.fromkeys(promoted, "target"))
                taken = [c for c in taken if c not in promoted]
                if taken:
                    notes.append(
                        f"every channel is binary, one-hot or few-valued: scoring the {level} "
                        f"one(s) as targets: {_short(promoted)}"
                    )
                break
        else:
            raise RoleError("no target channel: name at least one with --targets")
    if taken and (discrete_role != "target" or targets):
        what = "not used (ignored)" if discrete_role == "ignore" else "model inputs only (context)"
        notes.append(
            f"binary, one-hot or few-valued channel(s) {_short(taken)}: {what}, not scored; "
            "name them with --targets to score them"
        )
    return ChannelRoles(tuple(roles[c] for c in channels)), notes


def _short(names: Sequence[str], most: int = 8) -> str:
    """`a, b, c` or `a, b, ... (24)` for long lists."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[: most - 2])}, ..., {names[-1]} ({len(names)})"
