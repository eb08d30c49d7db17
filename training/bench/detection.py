"""What follows the window score, the same for every scorer: one function, `detect`.

A fitted scorer's outputs (`Evidence`: its calibration windows' scores and every window of the
table scored) are the costly part and can be cached (training/bench/cache.py); `detect` then runs
the product's stages on them: the trainer's calibration (`training.calibrate.calibrate_options`:
channel levels, thresholds on the detector's own smoothed scores, false alarms per day) and the
daemon's detector (`daemon.detector.replay`) decided causally row by row
(`training.evaluate.decide`). The benchmarks and the suite call nothing else after a scorer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.detector import Stages
from daemon.manifest import AlarmPolicy, Calibration, Detection
from training import calibrate as cal
from training.bench.scorer import Fitted
from training.calibrate import Series
from training.data import SensorTable
from training.evaluate import RowDecisions, WindowOutputs, decide, window_outputs

if TYPE_CHECKING:
    from training.config import TrainOptions

log = logging.getLogger(__name__)


@dataclass
class Evidence:
    """Everything the stages after a scorer need: calibration windows and the table's windows."""

    calibration: list[Series]  # calibration windows, one entry per contiguous run
    cross_fitted: bool
    period_s: float
    outputs: WindowOutputs
    # The product's own policy and stages from its model file: the shared calibration must
    # reproduce them.
    manifest_policy: AlarmPolicy | None = None
    manifest_detection: Detection | None = None
    notes: list[str] = field(default_factory=list)
    targets: tuple[int, ...] | None = None  # the scored channels (None: all)


@dataclass
class Outcome:
    """Per-row decisions on one table and the calibrated stages that made them."""

    rows: RowDecisions
    policy: AlarmPolicy
    detection: Detection
    calibration: Calibration


def evidence(fitted: Fitted, table: SensorTable, opts: TrainOptions) -> Evidence:
    """Score every hop-spaced window of `table` with the fitted scorer."""
    return Evidence(
        list(fitted.calibration),
        fitted.cross_fitted,
        fitted.period_s,
        window_outputs(fitted.model, table, opts.hop),
        fitted.manifest_policy,
        fitted.manifest_detection,
        list(fitted.notes),
        fitted.targets,
    )


def alarm_policy(found: Evidence, opts: TrainOptions) -> tuple[AlarmPolicy, Detection, Calibration]:
    """Calibrated policy and stages from the scorer's calibration windows, as the trainer builds
    them for the manifest (training/pipeline.py)."""
    return cal.calibrate_options(
        found.calibration, opts, found.period_s, found.cross_fitted, found.targets
    )


def same_policy(a: AlarmPolicy, b: AlarmPolicy, rel: float = 1e-6) -> bool:
    """Equal alarm policies, thresholds compared to a relative tolerance (float32 scores)."""
    rest = ("enter_threshold", "exit_threshold")
    close = all(math.isclose(getattr(a, k), getattr(b, k), rel_tol=rel) for k in rest)
    return close and a.model_dump(exclude=set(rest)) == b.model_dump(exclude=set(rest))


def detect(found: Evidence, opts: TrainOptions) -> Outcome:
    """Calibrate the stages on the scorer's calibration windows, then decide every row."""
    policy, detection, calibration = alarm_policy(found, opts)
    if found.manifest_policy is not None and not same_policy(policy, found.manifest_policy):
        # An error, not a warning: the benchmarks silence the trainer's warnings, and a mismatch
        # means the baselines are not calibrated as the product is.
        log.error(
            "the shared calibration gives %s, the model file %s: they should agree",
            policy,
            found.manifest_policy,
        )
    stages = Stages(detection, found.period_s, "benchmark", found.targets)
    return Outcome(decide(found.outputs, stages, policy), policy, detection, calibration)
