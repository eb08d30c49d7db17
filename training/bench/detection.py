"""What follows the window score, the same for every scorer: one function, `detect`.

Today's stages are the product's: thresholds calibrated on the scorer's held-back or cross-fitted
normal window scores (`training.calibrate.calibrate`: quantile or tail fit, margin, false alarms
per day), then the daemon's alarm policy (`daemon.alarm.replay`: smoothing, k-of-n, hysteresis,
cool-down) decided causally row by row (`training.evaluate.decide_rows`). New stages (calibrated
per-channel scores, dynamic thresholds, episode merging) replace the body of `detect`; the
benchmarks and the suite call nothing else after a scorer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.manifest import AlarmPolicy, Calibration
from training import calibrate as cal
from training.bench.scorer import Fitted
from training.data import SensorTable
from training.evaluate import RowDecisions, decide_rows

if TYPE_CHECKING:
    from training.config import TrainOptions

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """Per-row decisions on one table and the policy that made them."""

    rows: RowDecisions
    policy: AlarmPolicy
    calibration: Calibration


def alarm_policy(fitted: Fitted, opts: TrainOptions) -> tuple[AlarmPolicy, Calibration]:
    """Thresholds and alarm policy from the fitted scorer's calibration scores, as the trainer
    builds them for the manifest (training/pipeline.py)."""
    window, hop = opts.model.window, opts.hop
    base = AlarmPolicy(
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
    return cal.calibrate(
        fitted.calibration,
        base,
        fitted.period_s,
        q=opts.quantile,
        exit_q=opts.exit_quantile,
        target_per_day=opts.false_alarms_per_day,
        cross_fitted=fitted.cross_fitted,
        margin=opts.margin,
    )


def same_policy(a: AlarmPolicy, b: AlarmPolicy, rel: float = 1e-6) -> bool:
    """Equal alarm policies, thresholds compared to a relative tolerance (float32 scores)."""
    close = all(
        math.isclose(getattr(a, k), getattr(b, k), rel_tol=rel)
        for k in ("enter_threshold", "exit_threshold")
    )
    rest = ("enter_threshold", "exit_threshold")
    return close and a.model_dump(exclude=set(rest)) == b.model_dump(exclude=set(rest))


def detect(fitted: Fitted, table: SensorTable, opts: TrainOptions) -> Detection:
    """Calibrate the fitted scorer, then decide every row of `table` causally."""
    policy, calibration = alarm_policy(fitted, opts)
    if fitted.manifest_policy is not None and not same_policy(policy, fitted.manifest_policy):
        # An error, not a warning: the benchmarks silence the trainer's warnings, and a mismatch
        # means the baselines are not calibrated as the product is.
        log.error(
            "the shared calibration gives %s, the model file %s: they should agree",
            policy,
            fitted.manifest_policy,
        )
    return Detection(decide_rows(fitted.model, table, policy), policy, calibration)
