"""How a stream's detector adapts: the warm-up with a factor, and the dynamic threshold learning a
level the new-level stage accepted (daemon/detector.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from daemon.alarm import Transition
from daemon.config import ConfigError, load_config
from daemon.detector import Decision, Detector, Stages
from daemon.manifest import AlarmPolicy, Detection


def policy(**kw: Any) -> AlarmPolicy:
    base: dict[str, Any] = dict(enter_threshold=1.0, exit_threshold=0.5, k=3, n=5)
    base.update(clear_windows=2, cooldown_windows=0)
    base.update(kw)
    return AlarmPolicy(**base)


def stages(period_s: float = 0.5, **kw: Any) -> Stages:
    return Stages(Detection(**kw), period_s, "model-a")


def run(detector: Detector, scores: list[float]) -> list[Decision]:
    return [detector.update(s, np.array([s])) for s in scores]


def edges(decisions: list[Decision]) -> list[tuple[int, Transition]]:
    return [(i, d.transition) for i, d in enumerate(decisions) if d.transition is not None]


def dynamic_level(detector: Detector) -> float:
    """The dynamic threshold's own level (before the calibrated floor and the new level)."""
    return float(detector.snapshot()["baseline"]["level"])


ADAPTIVE = dict(baseline_samples=200, baseline_factor=3.0, baseline_refresh=1, baseline_seed=0.1)
# 200 warm-up windows of 0.5 s; during them only scores above 6 x the calibrated 1.0 alarm.
WARM = dict(ADAPTIVE, warmup_s=100.0, warmup_factor=6.0)


def test_during_the_warm_up_only_a_score_above_the_factor_alarms() -> None:
    d = Detector(stages(**WARM), policy())
    opening = run(d, [3.0] * 400 + [20.0] * 10)  # a level 3x the threshold: under 6x
    assert opening[0].threshold == pytest.approx(6.0)  # 6 x the calibrated enter threshold
    assert not any(x.active for x in opening[:400])  # learnt as this stream's normal
    assert dynamic_level(d) == pytest.approx(9.0)  # 3 x the median 3.0
    assert edges(opening) == [(402, Transition.START)]  # a fault after the warm-up alarms


def test_a_gross_fault_at_a_streams_start_alarms_and_is_not_learnt() -> None:
    warm = run(Detector(stages(**WARM), policy()), [10.0] * 600)
    assert edges(warm) == [(2, Transition.START)]  # k = 3 of 5 above 6.0
    assert warm[-1].active  # still in alarm long after the warm-up: never learnt
    assert warm[-1].threshold == pytest.approx(1.0)  # the trailing window kept the seed
    # The silent warm-up (factor 0) says nothing, learns the fault and never alarms on it.
    silent = run(Detector(stages(**dict(WARM, warmup_factor=0.0)), policy()), [10.0] * 600)
    assert not any(x.active for x in silent)


def test_model_files_without_a_warmup_factor_keep_the_silent_warm_up() -> None:
    old = Detection.model_validate({**ADAPTIVE, "warmup_s": 100.0})  # as exported before it
    assert old.warmup_factor == 0.0 and not old.baseline_learns_accepted
    decisions = run(Detector(Stages(old, 0.5, "m"), policy()), [10.0] * 200 + [40.0] * 3)
    assert not any(x.active for x in decisions[:200]) and decisions[-1].active
    with pytest.raises(ValueError, match="warmup_factor"):
        Detection(warmup_factor=0.5)


def test_the_warm_up_factor_survives_a_restart() -> None:
    st = stages(**WARM)
    halfway = Detector(st, policy())
    run(halfway, [0.1] * 150)
    restored = Detector(st, policy())
    restored.restore(json.loads(json.dumps(halfway.snapshot())))
    tail = run(restored, [3.0] * 50 + [10.0] * 3)  # 50 warm-up windows left: 3.0 is under 6x
    assert not any(x.active for x in tail[:50]) and tail[-1].active


# A level window of 400 windows of 0.5 s beside the dynamic threshold's 200: a level that lasts
# about 100 s ends its alarm as a new normal.
LEVEL = dict(ADAPTIVE, new_level_s=200.0, baseline_learns_accepted=True)


def test_a_level_the_new_level_stage_accepts_is_learnt_by_the_dynamic_threshold() -> None:
    d = Detector(stages(**LEVEL), policy())
    decisions = run(d, [0.1] * 1000 + [5.0] * 400)
    (start, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and decisions[end].new_normal
    assert start == 1002 and end - start > 150
    assert dynamic_level(Detector(stages(**LEVEL), policy())) == pytest.approx(0.3)
    assert dynamic_level(d) == pytest.approx(15.0)  # 3 x 5.0: the episode's windows went in
    # Without the setting, the dynamic threshold has learnt only the windows since the end.
    off = Detector(stages(**dict(LEVEL, baseline_learns_accepted=False)), policy())
    again = run(off, [0.1] * 1000 + [5.0] * (end + 1 - 1000))
    assert again[end].new_normal and dynamic_level(off) == pytest.approx(0.3)


def test_an_alarm_that_ends_by_itself_teaches_the_dynamic_threshold_nothing() -> None:
    d = Detector(stages(**LEVEL), policy())
    decisions = run(d, [0.1] * 1000 + [5.0] * 50 + [0.1] * 20)
    (_, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and not decisions[end].new_normal
    assert dynamic_level(d) == pytest.approx(0.3)  # no 5.0 in its trailing window


def test_an_alarm_ended_by_the_dynamic_threshold_is_not_learnt() -> None:
    # A stream whose normal is 2.0: the dynamic threshold (3 x 2.0 = 6, exit 3) is above the
    # calibrated 1.0 / 0.5. A fault at 10 alarms; back at 2.0 the dynamic exit ends it.
    d = Detector(stages(**dict(LEVEL, baseline_seed=2.0)), policy())
    decisions = run(d, [2.0] * 1000 + [10.0] * 50 + [2.0] * 20)
    (_, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and decisions[end].new_normal  # above the calibrated exit
    values = d.snapshot()["baseline"]["values"]
    # Only the two windows before k = 3 of 5 started the alarm went in, not the episode's 48.
    assert values.count(10.0) == 2 and dynamic_level(d) == pytest.approx(6.0)


def test_an_accepted_episode_is_learnt_across_a_restart_and_old_snapshots_still_load() -> None:
    st = stages(**LEVEL)
    a = Detector(st, policy())
    run(a, [0.1] * 1000 + [5.0] * 100)  # in alarm, not accepted yet
    assert a.active
    b = Detector(st, policy())
    b.restore(json.loads(json.dumps(a.snapshot())))
    assert run(a, [5.0] * 200) == run(b, [5.0] * 200)
    assert dynamic_level(b) == dynamic_level(a) == pytest.approx(15.0)
    old = Detector(st, policy())
    run(old, [0.1] * 1000 + [5.0] * 100)
    version1 = old.snapshot()
    version1["version"] = 1
    del version1["episode"]
    c = Detector(st, policy())
    c.restore(version1)  # a snapshot written before episodes were kept: the alarm goes on
    assert c.active and run(c, [5.0] * 3)[-1].active


def test_a_config_can_set_the_warm_up_and_the_learning() -> None:
    shipped = stages(**WARM)
    overrides = {"model.path": "m.onnx", "alarm.warmup_s": 0, "alarm.warmup_factor": 4}
    alarm = load_config(None, overrides | {"alarm.baseline_learns_accepted": False}).alarm
    changed = shipped.overridden(alarm).detection
    assert changed.warmup_s is None and changed.warmup_factor == 4.0
    assert not changed.baseline_learns_accepted
    with pytest.raises(ConfigError, match="warmup_factor"):
        load_config(None, {"model.path": "m.onnx", "alarm.warmup_factor": 0.5})


def test_inspect_says_how_a_streams_thresholds_move() -> None:
    from daemon.inspect_text import detection_line

    shipped = Detection(
        baseline_samples=2100,
        baseline_rule="nonparametric",
        new_level_s=800.0,
        warmup_s=300.0,
        warmup_factor=6.0,
        baseline_learns_accepted=True,
    )
    assert detection_line(shipped) == (
        "detection dynamic threshold (nonparametric) over 2100 samples; new level 800 s (learnt "
        "when accepted); warm-up 300 s (alarms above 6 x the thresholds)"
    )
    old = shipped.model_copy(update={"warmup_factor": 0.0, "baseline_learns_accepted": False})
    assert detection_line(old).endswith("new level 800 s; warm-up 300 s (silent)")
    assert detection_line(None) == "detection the calibrated thresholds only"


def test_a_recurring_fault_whose_onsets_fall_in_the_cool_down_is_not_learnt() -> None:
    # Normal 0.1; a fault of 5.0 for 10 windows in every 30. The alarm ends 2 windows after each
    # fault and cools down for 20: the next onset comes during the cool-down, raising no alarm.
    # Those windows are above the threshold all the same: the dynamic threshold must not take
    # them, or it climbs over the fault and every later onset is missed.
    # The nonparametric rule (the trainer's default) reacts to a few high values in its window.
    cycle = [0.1] * 20 + [5.0] * 10
    d = Detector(
        stages(**dict(ADAPTIVE, baseline_rule="nonparametric")), policy(cooldown_windows=20)
    )
    decisions = run(d, [0.1] * 200 + cycle * 20)
    late = decisions[-300:]  # the last ten cycles
    assert sum(1 for x in late if x.transition is Transition.START) == 10
    # The two windows before each START (k = 3 of 5) are learnt, as before: below the fault still.
    assert max(x.threshold for x in late) < 5.0


def test_a_stream_above_its_calibrated_level_teaches_its_trailing_window_that_level() -> None:
    # Calibration's normal is 0.1; this stream's own normal is 0.4 +- 0.1, well below the
    # calibrated threshold 1.0. After the 200-window warm-up its dynamic threshold describes
    # its own level at once, not 200 of its values among 200 seeds of its 400-window buffer.
    rng = np.random.default_rng(0)
    own = (0.4 + 0.1 * rng.standard_normal(200)).tolist()
    spread = dict(WARM, baseline_samples=400, baseline_rule="median")
    d = Detector(stages(**spread), policy())
    run(d, own)
    values = d.snapshot()["baseline"]["values"]
    assert 0.1 not in values and dynamic_level(d) == pytest.approx(3 * np.median(own))
    under = Detector(stages(**spread), policy())
    run(under, [0.05] * 200)  # under the calibrated level: the seed stays
    assert under.snapshot()["baseline"]["values"].count(0.1) == 200


def test_the_threshold_in_force_names_the_stage_that_sets_it() -> None:
    # The new level: 100 windows; the dynamic threshold does not learn what it accepts.
    d = Detector(stages(**dict(WARM, new_level_s=50.0, baseline_learns_accepted=False)), policy())
    assert (d.threshold_source, d.threshold) == ("warm_up", pytest.approx(6.0))
    run(d, [0.1] * 200)  # the warm-up at the seed's level: the seed stays
    assert (d.threshold_source, d.threshold) == ("calibrated", pytest.approx(1.0))
    run(d, [0.5] * 300)  # a higher normal level: 3 x its median beats the calibrated 1.0
    assert (d.threshold_source, d.threshold) == ("dynamic", pytest.approx(1.5))
    fault: list[Decision] = []  # alarms, then the new-level window accepts it: stop there
    for _ in range(200):
        fault += run(d, [5.0])
        if fault[-1].transition is Transition.END:
            break
    assert edges(fault)[0][1] is Transition.START and fault[-1].new_normal
    assert (d.threshold_source, d.threshold) == ("new_level", pytest.approx(15.0))
