"""Named training presets: the defaults that suit one kind of recording, measured once.

A preset maps field names of `ModelConfig`, `FitConfig` or `TrainOptions` to values;
`training.pipeline.options_for` builds the options from it, and anything the user sets explicitly
(`oteo train --preset small --window 64`) still wins. Torch-free, so the CLI can list the names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A one-line summary for `--help` and the settings it changes."""

    summary: str
    values: Mapping[str, Any]


PRESETS: dict[str, Preset] = {
    "default": Preset("hours of normal data or more: the trainer's own defaults", {}),
    # Chosen on SKAB valve1 files 0-7 (400 rows = 6.7 minutes per model) and reported on files
    # 8-15 as well; the numbers behind each value are in the README's Benchmarks section.
    "small": Preset(
        "a few hundred rows (minutes) of normal data, e.g. one short test-rig run",
        {
            "window": 32,
            "architecture": "dense",
            "hidden": 128,
            "code_size": 16,
            "noise_level": 0.2,
            "max_epochs": 60,
            "quantile": 0.999,
            # Minutes of data show a slow channel (a temperature) at almost one value: its
            # standard deviation is sensor noise, and the normal drift of the next hour then
            # reads as a many-sigma fault. A floor of 0.5 % of the channel's magnitude cut the
            # false-alarm rate on SKAB valve1 files 0-7 from 29 % to 13 % (1e-2: 8.5 %, with
            # twice the missed alarms). Units with a large offset (kelvin) make the floor wider.
            "scale_floor": 5e-3,
            # With the floor the cross-fitted thresholds need less margin: 1.25 (1.5: F1 0.73,
            # 1.1: FAR 20 %).
            "margin": 1.25,
            "k": 3,
            "n": 5,
            # Mild smoothing: fewer flickering alarm edges (changepoint score 39 -> 43), the
            # pointwise numbers unchanged.
            "smoothing_alpha": 0.5,
            "false_alarms_per_day": 1.0,
        },
    ),
}


def preset(name: str) -> Preset:
    """The preset called `name`; ValueError naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
