"""What a training run can be told: model shape, fit, calibration. Defined once, torch-free.

`ModelConfig` (the autoencoder), `FitConfig` (the optimiser) and `TrainOptions` (everything else
`oteo train` sets) are the one definition of each setting and its default; a field's `help`
metadata is its command-line help, and `option_fields` lists the fields `oteo train` offers as
options, so the CLI, presets and benchmarks cannot drift from the defaults here. The kinds of
architecture, variant and noise are the manifest's own types.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args

from daemon.manifest import (
    Architecture,
    BaselineRule,
    Combination,
    ErrorSample,
    ErrorTransform,
    Noise,
    Role,
    Variant,
)
from training.preset import preset

ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
VARIANTS: tuple[str, ...] = get_args(Variant)
NOISES: tuple[str, ...] = get_args(Noise)
ERRORS: tuple[str, ...] = get_args(ErrorTransform)
SAMPLES: tuple[str, ...] = get_args(ErrorSample)
COMBINATIONS: tuple[str, ...] = get_args(Combination)
BASELINE_RULES: tuple[str, ...] = get_args(BaselineRule)
ROLES: tuple[str, ...] = get_args(Role)


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ModelConfig:
    """Shape and training variant of an autoencoder; the defaults give a good first model."""

    channels: int
    # 32 samples: long enough to see the coupling between channels, short enough that a fault
    # dominates the window error within a few samples (detection delay).
    window: int = _help(32, "Samples per window.")
    architecture: str = _help("dense", "Autoencoder architecture.")
    variant: str = _help("denoising", "Training variant.")
    # Gaussian corruption at 0.2 standard deviations: enough to stop the identity mapping,
    # small against the faults we want to see.
    noise: str = _help("gaussian", "Corruption of the denoising variant.")
    noise_level: float = _help(0.2, "Std or probability of corruption.")
    # A 16-unit code for 32x8 = 256 inputs: an 16x bottleneck forces the model to learn the
    # coupling between channels instead of copying them.
    code_size: int = _help(16, "Bottleneck units (hash bits).")
    hidden: int = _help(128, "Hidden units.")
    hashing: bool = _help(False, "Near-binary code: code > 0.5 gives hash bits.")
    # Std of the noise added before the hashing sigmoid: pushes codes towards 0/1.
    hash_noise: float = 1.0
    sparsity_target: float = 0.05
    sparsity_weight: float = 0.1
    contractive_weight: float = 1e-3
    correntropy_sigma: float = 1.0
    kl_weight: float = 1e-3
    # Where the scored (target) channels sit among the `channels` inputs; empty: all of them.
    # The decoder rebuilds only these (training/role.py decides them).
    target_positions: tuple[int, ...] = ()
    # Newest steps of the target channels hidden from the model (set to their mean), in training
    # and in the exported graph, and the only steps scored: the model predicts them from history
    # and context. 0: plain reconstruction of the whole window.
    predict_steps: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, not {self.noise!r}")
        if self.variant == "denoising" and self.noise == "none":
            raise ValueError("the denoising variant needs a noise kind (gaussian, salt_pepper, …)")
        if self.architecture == "conv1d" and self.window % 4:
            raise ValueError(f"conv1d needs a window divisible by 4, not {self.window}")
        if self.window < 2 or self.channels < 1 or self.code_size < 1:
            raise ValueError("window must be >= 2, channels and code_size >= 1")
        if any(not 0 <= p < self.channels for p in self.target_positions) or len(
            set(self.target_positions)
        ) != len(self.target_positions):
            raise ValueError(f"target_positions must be distinct inputs 0..{self.channels - 1}")
        if not 0 <= self.predict_steps < self.window:
            raise ValueError(f"predict_steps must be in 0..{self.window - 1}")

    @property
    def targets(self) -> tuple[int, ...]:
        """Positions of the reconstructed channels among the inputs."""
        return self.target_positions or tuple(range(self.channels))

    @property
    def outputs(self) -> int:
        """Channels the decoder rebuilds (the targets)."""
        return len(self.targets)

    @property
    def sigmoid_code(self) -> bool:
        """Sparse (KL on mean activation) and hashing models need codes in (0, 1)."""
        return self.hashing or self.variant == "sparse"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FitConfig:
    """Optimiser and stopping settings; defaults fit 10k x 8 rows in seconds on 2 cores."""

    # Early stopping normally ends training long before this.
    max_epochs: int = _help(60, "Most epochs (early stopping).")
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-5
    # Epochs without a 0.1 % improvement of the held-back loss before stopping. The held-back
    # loss is noisy from epoch to epoch; stopping early leaves rare but normal patterns (set-point
    # changes) poorly reconstructed, which inflates the alarm threshold by an order of magnitude.
    patience: int = 12
    # A hard cap so a huge CSV cannot make training run for hours by default.
    max_steps: int = 20_000
    seed: int = _help(0, "Training seed.")
    progress: bool = True
    # Small autoencoders gain little from intra-op threads, and on a busy 2-core box OpenMP's
    # spinning threads made a step 30x slower (500 ms vs 16 ms measured here under load).
    threads: int = 1


@dataclass(frozen=True)
class TrainOptions:
    """Everything `oteo train` can set; the defaults give a good model for 1 Hz machine data."""

    model: ModelConfig
    fit: FitConfig = field(default_factory=FitConfig)
    name: str = "model"
    version: str = "1"
    heldback_fraction: float = 0.2
    # Window-level quantile of normal scores for the enter threshold, and for the exit.
    quantile: float = _help(0.999, "Enter threshold: this quantile of normal window scores.")
    exit_quantile: float = 0.99
    false_alarms_per_day: float | None = _help(
        1.0, "Event-level target on held-back data (0: none)."
    )
    # Thresholds x margin: a few hours of held-back data understate days of normal drift
    # (the published SKAB Conv-AE uses 1.333 x its training quantile for the same reason).
    margin: float = _help(
        1.5, "Multiply calibrated thresholds (held-back hours understate days of drift)."
    )
    hop: int = _help(1, "Samples between scored windows.")
    k: int = 3
    n: int = 5
    # An alarm clears after this many windows below the exit threshold: brief dips inside one
    # episode do not split it (30 vs 3: SKAB F1 +0.02..0.03, SMAP/MSL unchanged).
    clear_windows: int = _help(
        30, "An alarm ends after this many windows below the exit threshold."
    )
    cooldown_windows: int | None = None  # default: one window length
    smoothing_alpha: float = 1.0
    # Detection stages after the model (daemon/detector.py). Each default is the setting that
    # did best on all three benchmark sets at once (docs/benchmarks.md has the numbers).
    sample: str = _help(
        "window", "Error per channel: window (mean over the window) or newest (its last sample)."
    )
    error: str = _help("squared", "Per-channel window error: squared (mean square) or root (RMS).")
    normalise: bool = _help(
        False, "Divide each channel's error by its normal level before combining channels."
    )
    combine: str = _help("mean", "Combine channel errors by their mean or their max.")
    # Telemanom's window (30 x 70 samples) and rule at its published settings: an excursion
    # must stand out of the stream's own recent normal scores (SMAP/MSL F0.5 0.53 -> 0.69).
    baseline_samples: int = _help(
        2100,
        "Dynamic threshold: trailing window (samples) of the stream's recent scores "
        "(0: the calibrated threshold only).",
    )
    baseline_rule: str = _help(
        "nonparametric", "Dynamic threshold rule: median (x baseline_factor) or nonparametric."
    )
    baseline_factor: float = _help(
        2.5, "Median rule and new level: threshold = this x the trailing median score."
    )
    # A fault's settled state is a new normal once it has lasted ~400 s (SKAB labels it so: FAR
    # 24 -> 10 %); the end event says new_normal. Longer windows gave SKAB nothing (its faults
    # last minutes); 0 keeps every level in alarm for as long as it lasts.
    new_level_s: float = _help(
        800.0,
        "A level that persists about half this long (seconds) stops being an alarm, flagged "
        "as a new normal (0: off).",
    )
    # On SMAP/MSL dev 21 of the 29 false alarms started in a test array's first 2,100 rows, where
    # the stream's level differs from the training data's and the trailing windows still hold the
    # calibrated seed. A warm-up lets the stream teach them its own level first; during it only a
    # gross excursion (warmup_factor x the calibrated thresholds) alarms, so a fault at a
    # stream's start is not silently learnt (docs/benchmarks.md has the numbers).
    warmup_s: float = _help(
        300.0,
        "A new stream's first seconds teach its trailing windows before they judge it (0: off).",
    )
    warmup_factor: float = _help(
        6.0,
        "During the warm-up only scores above this x the calibrated thresholds alarm "
        "(0: the warm-up raises no alarm).",
    )
    # A level the new-level window accepts becomes normal for the dynamic threshold too, so the
    # stream's next excursion is judged against its accepted level, not the old one.
    baseline_learns_accepted: bool = _help(
        True,
        "An alarm accepted as a new normal teaches the dynamic threshold its level.",
    )
    new_normal_s: float = _help(
        0.0, "An alarm lasting this long (seconds) ends as an accepted new normal (0: never)."
    )
    # Whether the trailing window also learns from windows in alarm (a sustained level then
    # raises the threshold by itself); off, a fault is only accepted through new_normal_s.
    baseline_in_alarm: bool = False
    cross_fit: bool | None = None  # None: when held-back data are too few
    # Each channel's scale is at least this fraction of its mean magnitude: a near-constant
    # channel would otherwise get a near-zero scale and turn any wiggle into an alarm.
    scale_floor: float = 1e-3
    # Channel roles (training/role.py): named channels get the role named; the others are
    # classified from their normal rows.
    targets: tuple[str, ...] = _help(
        (), "Channels to score, comma-separated (default: every channel not binary/few-valued)."
    )
    context: tuple[str, ...] = _help(
        (), "Channels the model reads but does not score: commands, set points, modes."
    )
    ignore: tuple[str, ...] = _help((), "Channels the model neither reads nor scores.")
    discrete_role: str = _help(
        "ignore",
        "Role of binary, one-hot and few-valued channels not named in --targets, "
        "--context or --ignore.",
    )

    def __post_init__(self) -> None:
        if self.scale_floor < 0 or self.margin <= 0:
            raise ValueError("need scale_floor >= 0 and margin > 0")
        if self.sample not in SAMPLES:
            raise ValueError(f"sample must be one of {SAMPLES}, not {self.sample!r}")
        if self.error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, not {self.error!r}")
        if self.baseline_rule not in BASELINE_RULES:
            raise ValueError(
                f"baseline_rule must be one of {BASELINE_RULES}, not {self.baseline_rule!r}"
            )
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, not {self.combine!r}")
        if (
            min(self.baseline_samples, self.new_normal_s, self.new_level_s, self.warmup_s) < 0
            or self.baseline_factor <= 0
        ):
            raise ValueError(
                "need baseline_samples, new_normal_s, new_level_s, warmup_s >= 0 and "
                "baseline_factor > 0"
            )
        if self.new_normal_s and not self.baseline_samples:
            raise ValueError(
                "new_normal_s needs baseline_samples: a new normal is a baseline level"
            )
        if 0 < self.warmup_factor < 1:
            raise ValueError("warmup_factor must be 0 (a silent warm-up) or at least 1")
        if self.discrete_role not in ROLES:
            raise ValueError(f"discrete_role must be one of {ROLES}, not {self.discrete_role!r}")


SETTING_OWNERS = (ModelConfig, FitConfig, TrainOptions)


def setting_field(name: str) -> Any:
    """The dataclass field of a training setting, by name (KeyError if there is none)."""
    for owner in SETTING_OWNERS:
        for f in fields(owner):
            if f.name == name and f.name not in ("channels", "model", "fit"):
                return f
    raise KeyError(name)


def option_fields() -> list[Any]:
    """The settings `oteo train` offers as options: those with a help text, in order."""
    return [
        f
        for owner in SETTING_OWNERS
        for f in fields(owner)
        if "help" in f.metadata and f.name not in ("channels", "model", "fit")
    ]


def options_for(preset_name: str, channels: int, **values: Any) -> TrainOptions:
    """TrainOptions from a named preset (training/preset.py); `values` win, by field name."""
    groups: dict[type, dict[str, Any]] = {cls: {} for cls in SETTING_OWNERS}
    names = {cls: {f.name for f in fields(cls)} - {"channels", "model", "fit"} for cls in groups}
    for key, value in {**preset(preset_name).values, **values}.items():
        owner = next((cls for cls in groups if key in names[cls]), None)
        if owner is None:
            raise ValueError(f"unknown training setting {key!r}")
        groups[owner][key] = value
    return TrainOptions(
        model=ModelConfig(channels=channels, **groups[ModelConfig]),
        fit=FitConfig(**groups[FitConfig]),
        **groups[TrainOptions],
    )
