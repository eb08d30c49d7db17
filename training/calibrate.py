"""Alarm thresholds from onnxruntime scores of held-back normal windows.

Rule for a target quantile q of normal window scores:
- quantile: the empirical quantile, when there are at least 10 / (1 - q) windows;
- pot: peaks over threshold, a generalised Pareto fit to the excesses over a high empirical
  quantile, when there are at least `MIN_EXCEEDANCES` excesses to fit;
- max: otherwise, the largest score times a margin, with a warning that the data are too few.

The scores are those of the detector's own stages (daemon/detector.py): per-channel errors,
normalised by channel levels taken here, combined and smoothed, so that the thresholds mean the
same thing as the score they are compared with. A false-alarm target is then checked at the level
of alarm EVENTS: the whole detector is replayed over the held-back series and the enter
threshold raised until the replay meets the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from training.config import TrainOptions

from daemon.detector import Replay, Stages, replay
from daemon.manifest import AlarmPolicy, Calibration, Detection
from daemon.quantiles import ChannelQuantiles, Quantiles

MIN_EXCEEDANCES = 20
# The POT fit starts at this empirical quantile (or lower, to keep MIN_EXCEEDANCES excesses).
POT_BASE_QUANTILE = 0.95
MAX_RULE_MARGIN = 1.5
QUANTILE_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999)


@dataclass
class Threshold:
    value: float
    rule: str
    parameters: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def threshold(scores: np.ndarray, q: float) -> Threshold:
    """The score that normal windows exceed with probability 1 - q, by the best-supported rule."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no held-back windows to calibrate on")
    if n >= 10 / (1 - q):
        return Threshold(float(np.quantile(s, q)), "quantile")
    k = min(n - MIN_EXCEEDANCES, math.floor(n * POT_BASE_QUANTILE))
    if k >= n // 2 and n - k >= MIN_EXCEEDANCES:
        u = float(s[k - 1])
        excess = s[k:] - u
        excess = excess[excess > 0]
        if len(excess) >= MIN_EXCEEDANCES and np.ptp(excess) > 0:
            shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
            tail = len(excess) / n
            p = (1 - q) / tail
            if abs(shape) < 1e-6:
                value = u - scale * math.log(p)
            else:
                value = u + scale / shape * (p ** (-shape) - 1)
            if math.isfinite(value) and value >= u:
                params = {"u": u, "shape": float(shape), "scale": float(scale)}
                params["exceedances"] = float(len(excess))
                cap = float(s[-1]) * MAX_RULE_MARGIN
                if value <= cap:
                    return Threshold(float(value), "pot", params)
                # A very heavy fitted tail (shape near or above 1) extrapolates far past anything
                # seen; the fit is not trusted beyond the margin the "max" rule would use.
                warning = (
                    f"tail fit (shape {shape:.2f}) extrapolates to {value:.4g}; capped at "
                    f"{MAX_RULE_MARGIN} x the largest held-back score"
                )
                return Threshold(cap, "pot", {**params, "capped": 1.0}, [warning])
    warning = (
        f"only {n} held-back windows: too few for the q={q} quantile or a tail fit; "
        f"threshold = {MAX_RULE_MARGIN} x the largest score. Record more normal data."
    )
    return Threshold(float(s[-1] * MAX_RULE_MARGIN), "max", {"margin": MAX_RULE_MARGIN}, [warning])


def quantile_table(scores: np.ndarray) -> Quantiles:
    """Score quantiles for p-values: empirical where supported, tail rule beyond, monotone."""
    values = [threshold(scores, q).value for q in QUANTILE_LEVELS]
    return Quantiles(levels=list(QUANTILE_LEVELS), values=np.maximum.accumulate(values).tolist())


def channel_quantile_table(channel_scores: np.ndarray) -> ChannelQuantiles:
    """Empirical per-channel quantiles (normalises each channel's contribution)."""
    levels = [0.5, 0.9, 0.99]
    values = np.quantile(channel_scores, levels, axis=0).T  # [C, L]
    return ChannelQuantiles(levels=levels, values=values.tolist())


@dataclass(frozen=True)
class Series:
    """One contiguous run of hop-spaced calibration windows, as the model scored them."""

    score: np.ndarray  # [n]
    channel: np.ndarray  # [n, C]
    newest: np.ndarray | None = None  # [n, C] squared standardised error of each newest sample

    def __len__(self) -> int:
        return len(self.score)

    def replay(self, stages: Stages, policy: AlarmPolicy) -> Replay:
        """The detector over these windows."""
        return replay(stages, policy, self.score, self.channel, newest=self.newest)


# Each channel's normal error level is this quantile of its calibration errors: the level a
# normalised channel error of 1 stands for.
CHANNEL_LEVEL_QUANTILE = 0.99
# A channel whose normal error is (near) zero, such as a constant one, would turn any wiggle into
# a huge normalised error: its level is at least this share of the channels' mean level.
CHANNEL_LEVEL_FLOOR = 0.01


def channel_levels(series: Sequence[Series], detection: Detection) -> list[float]:
    """Each channel's normal error level (after the detection's error transform)."""
    errors = [s.newest if detection.sample == "newest" else s.channel for s in series]
    if any(e is None for e in errors):
        raise ValueError("detection.sample is 'newest' but the calibration has no newest errors")
    channel = np.concatenate(errors).astype(np.float64)  # type: ignore[arg-type]
    if detection.error == "root":
        channel = np.sqrt(np.maximum(channel, 0.0))
    level = np.quantile(channel, CHANNEL_LEVEL_QUANTILE, axis=0)
    floor = max(CHANNEL_LEVEL_FLOOR * float(level.mean()), 1e-12)
    return np.maximum(level, floor).tolist()


def smoothed_scores(stages: Stages, policy: AlarmPolicy, series: Sequence[Series]) -> np.ndarray:
    """The detection score of every calibration window as the detector computes it."""
    parts = [s.replay(stages, policy).score for s in series]
    return np.concatenate(parts) if parts else np.empty(0)


def events_per_day(
    series: Sequence[Series], stages: Stages, policy: AlarmPolicy
) -> tuple[float, float]:
    """(alarm events per day, hours) when the detector is replayed over each contiguous series."""
    events = sum(s.replay(stages, policy).events for s in series)
    hours = sum(len(s) for s in series) * policy.hop * stages.period_s / 3600
    return (events / (hours / 24) if hours > 0 else 0.0), hours


def calibrate(
    series: Sequence[Series],
    base: AlarmPolicy,
    detection: Detection,
    period_s: float,
    *,
    q: float,
    exit_q: float,
    target_per_day: float | None,
    cross_fitted: bool,
    margin: float = 1.0,
    targets: tuple[int, ...] | None = None,
) -> tuple[AlarmPolicy, Detection, Calibration]:
    """Thresholds and detection baselines from held-back windows (hop-spaced, per series).

    The windows go through the detector's own stages (error, channel levels, combination,
    smoothing) and the thresholds are quantiles of what comes out. `margin` multiplies both:
    hours of held-back data cannot show the drift of days (wear, seasons), so a quantile of
    them is optimistic for the weeks a model serves.
    """
    if detection.normalise:
        detection = detection.model_copy(
            update={"channel_level": channel_levels(series, detection)}
        )
    static = detection.model_copy(
        update={
            "baseline_samples": None,
            "new_level_s": None,
            "new_normal_s": None,
            "warmup_s": None,
        }
    )
    plain = Stages(static, period_s, "calibration", targets)
    scores = smoothed_scores(plain, base, series)
    enter = threshold(scores, q)
    leave = threshold(scores, exit_q)
    enter_value = enter.value * margin
    exit_value = min(leave.value, enter.value) * margin
    detection = detection.model_copy(
        update={
            "baseline_seed": float(np.median(scores)),
            "score_quantiles": quantile_table(scores),
        }
    )
    # The false-alarm rate of a stream already warmed up: the warm-up would hide held-back alarms.
    running = detection.model_copy(update={"warmup_s": None})
    stages = Stages(running, period_s, "calibration", targets)
    policy = base.model_copy(update={"enter_threshold": enter_value, "exit_threshold": exit_value})
    rate, hours = events_per_day(series, stages, policy)
    warnings = list(enter.warnings)
    if target_per_day is not None and rate > target_per_day:
        policy, rate = _raise_until(series, stages, policy, target_per_day)
        warnings.append(
            f"enter threshold raised from {enter_value:.4g} to {policy.enter_threshold:.4g} "
            f"to meet {target_per_day} false alarms/day on the held-back data"
        )
    if target_per_day is not None and hours < 24 / max(target_per_day, 1e-9):
        warnings.append(
            f"held-back data cover {hours:.1f} h: too short to confirm {target_per_day} "
            "false alarms/day; the estimate is optimistic"
        )
    calibration = Calibration(
        rule=enter.rule,  # type: ignore[arg-type]
        quantile=q,
        exit_quantile=exit_q,
        windows=len(scores),
        cross_fitted=cross_fitted,
        parameters={**enter.parameters, "margin": margin},
        target_false_alarms_per_day=target_per_day,
        false_alarms_per_day=rate,
        heldback_hours=hours,
        warnings=warnings,
    )
    return policy, detection, calibration


def requested(opts: TrainOptions) -> tuple[AlarmPolicy, Detection]:
    """The alarm policy and detection stages `opts` ask for, before calibration."""
    window, hop = opts.model.window, opts.hop
    policy = AlarmPolicy(
        hop=hop,
        enter_threshold=1.0,
        exit_threshold=1.0,
        k=opts.k,
        n=opts.n,
        clear_windows=opts.clear_windows,
        cooldown_windows=opts.cooldown_windows
        if opts.cooldown_windows is not None
        else window // hop,
        smoothing_alpha=opts.smoothing_alpha,
    )
    detection = Detection(
        sample=opts.sample,  # type: ignore[arg-type]
        error=opts.error,  # type: ignore[arg-type]
        normalise=opts.normalise,
        combine=opts.combine,  # type: ignore[arg-type]
        baseline_samples=opts.baseline_samples or None,
        baseline_rule=opts.baseline_rule,  # type: ignore[arg-type]
        baseline_factor=opts.baseline_factor,
        baseline_in_alarm=opts.baseline_in_alarm,
        new_level_s=opts.new_level_s or None,
        new_normal_s=opts.new_normal_s or None,
        warmup_s=opts.warmup_s or None,
        warmup_factor=opts.warmup_factor,
        baseline_learns_accepted=opts.baseline_learns_accepted,
    )
    return policy, detection


def calibrate_options(
    series: Sequence[Series],
    opts: TrainOptions,
    period_s: float,
    cross_fitted: bool,
    targets: tuple[int, ...] | None = None,
) -> tuple[AlarmPolicy, Detection, Calibration]:
    """`calibrate` with everything `opts` set: the trainer's and the benchmarks' one call."""
    policy, detection = requested(opts)
    return calibrate(
        series,
        policy,
        detection,
        period_s,
        q=opts.quantile,
        exit_q=opts.exit_quantile,
        target_per_day=opts.false_alarms_per_day,
        cross_fitted=cross_fitted,
        margin=opts.margin,
        targets=targets,
    )


def _raise_until(
    series: Sequence[Series], stages: Stages, policy: AlarmPolicy, target: float
) -> tuple[AlarmPolicy, float]:
    """Smallest enter threshold (bisection, ratio to the exit threshold kept) meeting the target."""
    lo = policy.enter_threshold
    top = float(np.max(smoothed_scores(stages, policy, series)))
    hi = max(top * 1.01, lo * 1.01)
    ratio = policy.exit_threshold / policy.enter_threshold

    def at(value: float) -> AlarmPolicy:
        return policy.model_copy(update={"enter_threshold": value, "exit_threshold": value * ratio})

    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if events_per_day(series, stages, at(mid))[0] > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-4 * hi:
            break
    best = at(hi)
    return best, events_per_day(series, stages, best)[0]
