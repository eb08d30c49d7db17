"""The model manifest: what an exported ONNX file says about itself.

The trainer writes it as JSON into the file's `metadata_props["oteo"]`; the daemon, `oteo
evaluate` and the benchmarks read it back. It is the single definition of the contract, so every
consumer makes the same decisions from the same file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from daemon.quantiles import ChannelQuantiles, Quantiles

SCHEMA_VERSION = 1
METADATA_KEY = "oteo"

Architecture = Literal["dense", "conv1d", "gru", "lstm"]
Variant = Literal["basic", "denoising", "sparse", "contractive", "robust", "variational"]
Noise = Literal["none", "gaussian", "salt_pepper", "masking", "cauchy"]
ThresholdRule = Literal["quantile", "pot", "max"]
ErrorTransform = Literal["squared", "root"]
Combination = Literal["mean", "max"]
BaselineRule = Literal["median", "nonparametric"]
ErrorSample = Literal["window", "newest"]
# target: a model input whose reconstruction error is scored; context: a model input only
# (commands, set points, binary states, operating mode); ignore: received, not used at all.
Role = Literal["target", "context", "ignore"]


class ManifestError(ValueError):
    """The manifest is missing, malformed, or of a schema this runtime does not know."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AlarmPolicy(_Strict):
    """How window scores become alarms; `oteo evaluate`, the benchmarks and the daemon share it."""

    hop: int = Field(1, ge=1, description="Samples between two scored windows of a stream.")
    enter_threshold: float = Field(
        gt=0, description="Smoothed score at or above which a window counts as exceeding."
    )
    exit_threshold: float = Field(
        gt=0, description="An active alarm ends once the smoothed score stays below this."
    )
    k: int = Field(3, ge=1, description="Exceeding windows among the last `n` that raise an alarm.")
    n: int = Field(5, ge=1, description="Length of the k-of-n minimum-duration window.")
    clear_windows: int = Field(
        3, ge=1, description="Consecutive windows below `exit_threshold` that end an alarm."
    )
    cooldown_windows: int = Field(
        0, ge=0, description="Windows after an alarm ends during which no new alarm starts."
    )
    smoothing_alpha: float = Field(
        1.0, gt=0, le=1, description="EWMA weight of the newest score; 1 means no smoothing."
    )

    @model_validator(mode="after")
    def _check_consistent(self) -> AlarmPolicy:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        if self.exit_threshold > self.enter_threshold:
            raise ValueError(
                f"exit_threshold ({self.exit_threshold}) must not exceed "
                f"enter_threshold ({self.enter_threshold})"
            )
        return self


class Calibration(_Strict):
    """How the alarm thresholds were derived from scores of held-back normal windows."""

    rule: ThresholdRule = Field(
        description="quantile: empirical; pot: generalised Pareto tail fit; "
        "max: too few windows for either, the largest score times a margin (warned)."
    )
    quantile: float = Field(gt=0, lt=1, description="Target quantile of normal window scores.")
    exit_quantile: float = Field(gt=0, lt=1, description="Quantile used for the exit threshold.")
    windows: int = Field(ge=1, description="Held-back normal windows the scores came from.")
    cross_fitted: bool = Field(
        description="Scores came from models that did not see those windows (small data)."
    )
    parameters: dict[str, float] = Field(
        default_factory=dict, description="Rule parameters (POT: u, shape, scale, exceedances)."
    )
    target_false_alarms_per_day: float | None = Field(
        None, ge=0, description="User target for alarm events per day on normal data."
    )
    false_alarms_per_day: float = Field(
        ge=0, description="Alarm events per day when the policy is replayed on held-back data."
    )
    heldback_hours: float = Field(ge=0, description="Duration of the held-back data.")
    warnings: list[str] = Field(default_factory=list)


class Detection(_Strict):
    """The stages between a window's per-channel errors and the alarm policy (daemon/detector.py).

    Absent in files exported before it existed: those run `Detection.legacy()`, which reproduces
    the behaviour they were calibrated with (the graph's score, a calibrated threshold only).
    """

    sample: ErrorSample = Field(
        "window",
        description="Which error each channel contributes: window = the mean over the window "
        "(the graph's channel_score); newest = the squared standardised error of the window's "
        "newest sample alone (reacts at once when a fault starts and when it ends).",
    )
    error: ErrorTransform = Field(
        "squared",
        description="Per-channel window error: squared = the graph's channel_score (mean squared "
        "standardised error over the window); root = its square root (RMS), which lets one "
        "large deviation weigh less against many small ones.",
    )
    normalise: bool = Field(
        False,
        description="Divide each channel's error by its normal level (channel_level) before "
        "combining, so that every channel counts in units of its own normal error.",
    )
    combine: Combination = Field(
        "mean",
        description="How channel errors become one score: their mean, or their max (one faulty "
        "channel among many is not diluted).",
    )
    channel_level: list[float] | None = Field(
        None,
        description="Per channel, its normal error level (a quantile of calibration errors, "
        "after `error`); needed when `normalise` is on (calibration sets it).",
    )
    baseline_samples: int | None = Field(
        None,
        ge=1,
        description="Length of the trailing window of the dynamic threshold, in samples: the "
        "enter threshold is the higher of the calibrated one and what the baseline rule makes "
        "of the stream's recent smoothed scores. None: the calibrated threshold only.",
    )
    baseline_rule: BaselineRule = Field(
        "median",
        description="The dynamic threshold over the trailing window: median = baseline_factor x "
        "its median; nonparametric = Hundman et al.'s epsilon (mean + z x std, z searched) with "
        "its pruning floor (daemon/threshold.py).",
    )
    baseline_factor: float = Field(
        1.75, gt=0, description="median rule: dynamic enter threshold = this x the median."
    )
    baseline_refresh: int = Field(
        16, ge=1, description="Windows between two recomputations of the trailing median."
    )
    baseline_seed: float | None = Field(
        None,
        ge=0,
        description="The calibrated normal level of the smoothed score; a stream's trailing "
        "window starts full of it, so it adapts only once it has seen enough of its own data.",
    )
    baseline_in_alarm: bool = Field(
        False,
        description="The trailing window also takes windows in alarm, so a sustained level "
        "raises the threshold by itself (an end caused that way is flagged new_normal). False: "
        "only normal windows; a fault is accepted only through new_normal_s.",
    )
    new_level_s: float | None = Field(
        None,
        gt=0,
        description="A second trailing window, in seconds of data, that takes every window, in "
        "alarm too: the enter threshold is at least baseline_factor x its median, so a level "
        "that persists for about half of it stops being an alarm, and that end says new_normal. "
        "None: off.",
    )
    warmup_s: float | None = Field(
        None,
        gt=0,
        description="A new stream's first seconds of data teach its trailing windows before "
        "they judge it: a stream whose normal level differs from the training data's settles "
        "first. During it only a score above warmup_factor x the calibrated thresholds alarms. "
        "None: judged from the first window.",
    )
    warmup_factor: float = Field(
        0.0,
        ge=0,
        description="During the warm-up, windows are judged against the calibrated enter / exit "
        "thresholds x this factor (never below the thresholds otherwise in force), and windows "
        "in alarm do not enter the trailing windows: a gross fault at a stream's start alarms "
        "and is not learnt (one below this factor x the threshold is). 0: the warm-up raises no "
        "alarm (files exported before this field).",
    )
    baseline_learns_accepted: bool = Field(
        False,
        description="When the new-level stage ends an alarm as a new normal, the dynamic "
        "threshold's trailing window takes in that episode's windows, so the accepted level is "
        "the stream's normal for it too. Alarms that end by themselves or through the dynamic "
        "threshold teach it nothing. False: it learns from normal windows only.",
    )
    new_normal_s: float | None = Field(
        None,
        gt=0,
        description="An alarm that has lasted this long (seconds of data) ends as a new normal: "
        "the stream's baseline takes the current level and the end event says so. None: never; "
        "an alarm lasts as long as the score stays high.",
    )
    score_quantiles: Quantiles | None = Field(
        None,
        description="Quantiles of the detection score (after combining and smoothing) on the "
        "calibration windows: p-values of Decision.score.",
    )

    @classmethod
    def legacy(cls) -> Detection:
        """What files without a detection section were calibrated for."""
        return cls(error="squared", normalise=False, combine="mean", baseline_samples=None)

    @model_validator(mode="after")
    def _check(self) -> Detection:
        if self.channel_level is not None and any(v <= 0 for v in self.channel_level):
            raise ValueError("channel_level values must be > 0")
        if 0 < self.warmup_factor < 1:
            raise ValueError("warmup_factor must be 0 (a silent warm-up) or at least 1")
        if self.new_normal_s is not None and self.baseline_samples is None:
            raise ValueError("new_normal_s needs baseline_samples: a new normal is a baseline")
        return self


class Provenance(_Strict):
    data_fingerprint: str = Field(description="sha256 of the training matrix (float32 bytes).")
    source: str = Field("", description="Where the training data came from (file name).")
    rows: int = Field(ge=0)
    train_windows: int = Field(ge=0)
    seed: int
    epochs: int = Field(ge=0)
    train_seconds: float = Field(ge=0)
    oteo_version: str
    torch_version: str = ""


class Validation(_Strict):
    train_loss: float
    heldback_loss: float
    parity_max_rel_error: float = Field(
        description="Largest relative difference torch vs onnxruntime at export."
    )
    code_binariness: float | None = Field(
        None, description="Hashing models: share of code units farther than 0.4 from 0.5."
    )


class Manifest(_Strict):
    """Everything the runtime needs to know about a model file."""

    schema_version: int = Field(SCHEMA_VERSION, description="Manifest schema version.")
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created: str = Field(description="RFC 3339 UTC time of export.")
    channels: list[str] = Field(min_length=1, description="Channel names, in input order.")
    channel_mean: list[float] = Field(description="Standardisation mean per channel (raw units).")
    channel_scale: list[float] = Field(description="Standardisation scale per channel (> 0).")
    window: int = Field(ge=2, description="Samples per window.")
    sample_period_s: float = Field(gt=0, description="Expected time between samples.")
    architecture: Architecture
    variant: Variant
    noise: Noise = "none"
    noise_level: float = Field(0.0, ge=0)
    code_size: int = Field(ge=1)
    hashable: bool = Field(description="The code is near-binary: code > 0.5 gives hash bits.")
    code_median: list[float] | None = Field(
        None,
        description="Median of each code unit over held-back normal windows. Models not trained "
        "for hashing derive hash bits as code > code_median (one bit per unit, about half set on "
        "normal data); absent in files exported before it existed.",
    )
    residual_spread: list[float] | None = Field(
        None,
        description="Per channel, the spread (std) of its window-mean residual (observed - "
        "reconstruction, in standardised units) over held-back normal windows: the scale of "
        "the residual signature that compares alarm episodes (daemon/signature.py); absent in "
        "files exported before it existed.",
    )
    calibration: Calibration
    alarm: AlarmPolicy
    score_quantiles: Quantiles
    channel_score_quantiles: ChannelQuantiles
    detection: Detection | None = Field(
        None,
        description="Scoring stages after the model (daemon/detector.py); absent in older "
        "files, which then run Detection.legacy().",
    )
    constant_channels: list[str] = Field(
        default_factory=list, description="Channels near-constant in training (reported)."
    )
    roles: list[Role] = Field(
        default_factory=list,
        description="Role of each channel, in channel order: target (model input, scored), "
        "context (model input only) or ignore (in the input window, dropped by the graph). "
        "`score` covers target channels only; `channel_score` is 0 and `reconstruction` the "
        "input for the others. Empty: every channel is a target (files exported before roles).",
    )
    provenance: Provenance
    validation: Validation

    @model_validator(mode="after")
    def _check_channels(self) -> Manifest:
        n = len(self.channels)
        if len(set(self.channels)) != n:
            raise ValueError("channel names must be unique")
        if len(self.channel_mean) != n or len(self.channel_scale) != n:
            raise ValueError("channel_mean and channel_scale need one value per channel")
        if any(s <= 0 for s in self.channel_scale):
            raise ValueError("channel_scale values must be > 0")
        if len(self.channel_score_quantiles.values) != n:
            raise ValueError("channel_score_quantiles needs one row per channel")
        d = self.detection
        if d is not None and d.normalise and d.channel_level is None:
            raise ValueError("detection.normalise needs channel_level (one value per channel)")
        if d is not None and d.channel_level is not None and len(d.channel_level) != n:
            raise ValueError("detection.channel_level needs one value per channel")
        if self.code_median is not None and len(self.code_median) != self.code_size:
            raise ValueError("code_median needs one value per code unit")
        if self.residual_spread is not None and len(self.residual_spread) != n:
            raise ValueError("residual_spread needs one value per channel")
        if self.roles and len(self.roles) != n:
            raise ValueError("roles needs one role per channel (or none: all targets)")
        if self.roles and "target" not in self.roles:
            raise ValueError("roles needs at least one target channel")
        return self

    def channel_roles(self) -> list[Role]:
        """The role of every channel, in channel order (all targets for files without roles)."""
        return list(self.roles) if self.roles else ["target"] * len(self.channels)

    def target_indices(self) -> list[int]:
        """Indices of the scored channels: the only ones an event may name."""
        return [i for i, r in enumerate(self.channel_roles()) if r == "target"]

    def hash_cut(self) -> np.ndarray | None:
        """Per code unit, the value above which a bit is set; None: the model cannot hash."""
        if self.hashable:
            return np.full(self.code_size, 0.5)
        if self.code_median is not None:
            return np.asarray(self.code_median)
        return None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest, refusing unknown schema versions with a clear message."""
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported (this oteo reads "
                f"{SCHEMA_VERSION}); re-export the model with a matching oteo"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise ManifestError(f"manifest.{where}: {first['msg']}") from exc


def utc_now() -> str:
    """Current time as an RFC 3339 UTC string with a Z suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
