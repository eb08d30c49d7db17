"""Quantile tables of normal scores, as the manifest carries them.

`Quantiles` turns a score into a calibrated p-value (the window score's table, and the
detection score's); `ChannelQuantiles` holds one table per channel, to normalise each
channel's contribution. Both are written by the trainer's calibration and read by the daemon.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Quantiles(BaseModel):
    """Quantiles of scores of normal windows: turn a score into a p-value or a normalised value."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every manifest section

    levels: list[float] = Field(description="Increasing probabilities in (0, 1).")
    values: list[float] = Field(description="Score at each level (non-decreasing).")

    @model_validator(mode="after")
    def _check(self) -> Quantiles:
        if len(self.levels) != len(self.values) or len(self.levels) < 2:
            raise ValueError("levels and values must have the same length (at least 2)")
        if any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError("levels must increase")
        return self

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # Converted once: p_value runs for every published score.
        return np.asarray(self.levels), np.asarray(self.values)

    def p_value(self, score: float) -> float:
        """P(normal score >= score), interpolated between the tabulated quantiles."""
        lv, vals = self._arrays
        # Beyond the last tabulated value the p-value is floored at 1 - levels[-1].
        return 1.0 - float(np.interp(score, vals, lv, left=0.0, right=lv[-1]))


class ChannelQuantiles(BaseModel):
    """Per-channel quantiles of normal channel scores (one list of values per channel)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    levels: list[float]
    values: list[list[float]] = Field(description="values[c][i]: channel c at levels[i].")
