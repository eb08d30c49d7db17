"""The detection stages one stream runs after the model: daemon/detector.py and its parts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from daemon.alarm import AlarmTracker, Transition
from daemon.detector import Decision, Detector, SnapshotError, Stages, combine_errors, replay
from daemon.manifest import AlarmPolicy, Detection
from daemon.threshold import TrailingBaseline


def policy(**kw: Any) -> AlarmPolicy:
    base: dict[str, Any] = dict(enter_threshold=1.0, exit_threshold=0.5, k=3, n=5)
    base.update(clear_windows=2, cooldown_windows=0)
    base.update(kw)
    return AlarmPolicy(**base)


def stages(period_s: float = 1.0, **kw: Any) -> Stages:
    return Stages(Detection(**kw), period_s, "model-a")


ADAPTIVE = dict(baseline_samples=200, baseline_factor=2.0, baseline_refresh=1, baseline_seed=0.1)


def run(detector: Detector, scores: list[float] | np.ndarray) -> list[Decision]:
    return [detector.update(float(s), np.array([float(s)])) for s in scores]


def edges(decisions: list[Decision]) -> list[tuple[int, Transition]]:
    return [(i, d.transition) for i, d in enumerate(decisions) if d.transition is not None]


def test_legacy_stages_decide_exactly_as_the_alarm_tracker() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(0.6, 500)
    p = policy(smoothing_alpha=0.3, cooldown_windows=4)
    tracker = AlarmTracker(p)
    old = [tracker.update(s) for s in scores]
    new = run(Detector(stages(), p), scores)
    assert [(d.score, d.active, d.transition) for d in new] == [
        (s.smoothed, s.active, s.transition) for s in old
    ]


def test_replay_equals_the_per_update_loop_on_every_output() -> None:
    rng = np.random.default_rng(1)
    channel = rng.exponential(0.3, (600, 3))
    channel[300:420, 1] += 3.0
    score = channel.mean(axis=1)
    score[200] = np.nan  # a gap
    st = stages(error="root", normalise=True, combine="max", channel_level=[0.5, 0.4, 0.6])
    st = Stages(st.detection.model_copy(update=ADAPTIVE | {"new_normal_s": 60.0}), 1.0, "m")
    p = policy(smoothing_alpha=0.2)
    found = replay(st, p, score, channel)
    live = Detector(st, p)
    for i in range(len(score)):
        if np.isnan(score[i]):
            live.reset()
            assert np.isnan(found.score[i]) and not found.active[i]
            continue
        d = live.update(score[i], channel[i])
        assert (d.score, d.threshold, d.active, d.new_normal) == (
            found.score[i],
            found.threshold[i],
            found.active[i],
            found.new_normal[i],
        )
    assert found.active.any() and found.new_normal.any()


def test_a_gap_restarts_smoothing_and_ends_the_alarm() -> None:
    d = Detector(stages(), policy(k=1, n=1, smoothing_alpha=0.5))
    assert run(d, [4.0])[0].active
    d.reset()
    assert not d.active
    # After the reset the first score is taken as is, not blended with the 4.0 before the gap.
    assert run(d, [0.2])[0].score == pytest.approx(0.2)


def test_sensitivity_divides_the_thresholds_at_any_time() -> None:
    d = Detector(stages(), policy(k=1, n=1, clear_windows=1))
    assert not run(d, [0.6])[0].active
    d.sensitivity = 2.0
    assert d.threshold == pytest.approx(0.5)
    first, second, third = run(d, [0.6, 0.3, 0.2])
    assert first.transition is Transition.START and first.threshold == pytest.approx(0.5)
    assert second.active  # 0.3 >= exit 0.5 / 2
    assert third.transition is Transition.END


def test_channel_errors_are_normalised_and_one_faulty_channel_is_not_diluted() -> None:
    channel = np.array([[0.1] * 19 + [4.0]])
    mean = Detection(normalise=True, channel_level=[0.1] * 20)
    assert combine_errors(mean, np.array([0.0]), channel)[0] == pytest.approx((19 + 40) / 20)
    biggest = mean.model_copy(update={"combine": "max"})
    assert combine_errors(biggest, np.array([0.0]), channel)[0] == pytest.approx(40.0)
    root = Detection(error="root", combine="max")
    assert combine_errors(root, np.array([0.0]), channel)[0] == pytest.approx(2.0)


def test_only_target_channels_count_and_the_targets_come_from_the_manifest_roles() -> None:
    from tests.unit.scorer_stub import make_manifest

    channel = np.array([[0.1, 9.0, 0.3]])  # channel 1 is a command: model input only
    d = Detection(normalise=True, channel_level=[0.1, 0.1, 0.1], combine="max")
    assert combine_errors(d, np.array([0.0]), channel, (0, 2))[0] == pytest.approx(3.0)
    assert combine_errors(d, np.array([0.0]), channel)[0] == pytest.approx(90.0)
    zeros, ones = np.zeros(3), np.ones(3)
    plain = make_manifest(["a", "cmd", "b"], zeros, ones)
    assert Stages.of(plain).targets is None
    with_roles = plain.model_copy(update={"roles": ["target", "context", "target"]})
    assert Stages.of(with_roles).targets == (0, 2)


def test_the_dynamic_threshold_follows_the_trailing_median_of_normal_windows() -> None:
    d = Detector(stages(**ADAPTIVE), policy())
    assert d.threshold == pytest.approx(1.0)  # 2 x seed 0.1 is below the calibrated 1.0
    run(d, [0.8] * 150)  # a quieter-than-calibrated stream drifts up, still below 1.0
    assert d.threshold == pytest.approx(1.6)  # the median is now 0.8: the threshold 2 x 0.8
    assert not d.active


def test_a_sustained_fault_is_not_silently_cleared() -> None:
    d = Detector(stages(**ADAPTIVE), policy())
    decisions = run(d, [0.1] * 100 + [5.0] * 2000)
    assert edges(decisions) == [(102, Transition.START)]
    assert decisions[-1].active  # baseline learns only from normal windows


def test_a_new_normal_is_accepted_after_the_configured_seconds_and_flagged() -> None:
    d = Detector(stages(period_s=0.5, new_normal_s=300.0, **ADAPTIVE), policy())
    decisions = run(d, [0.1] * 100 + [5.0] * 2000)
    (start, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and decisions[end].new_normal
    assert (end - start + 1) * 0.5 == pytest.approx(300.0)  # 600 windows of 0.5 s
    assert not any(x.active for x in decisions[end:])  # the level is normal now
    assert sum(x.new_normal for x in decisions) == 1


def test_a_persisting_level_ends_as_a_new_normal_after_about_half_the_level_window() -> None:
    """new_level_s: a median window over every window, in alarm too, in seconds of data."""
    level = dict(new_level_s=200.0, baseline_factor=3.0, baseline_refresh=1, baseline_seed=0.1)
    d = Detector(stages(period_s=0.5, **level), policy())
    decisions = run(d, [0.1] * 1000 + [5.0] * 2000)
    (start, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and decisions[end].new_normal
    # 400 windows of 0.5 s: the median turns to 5.0 once half of them are the new level
    assert (end - start) * 0.5 == pytest.approx(100.0, abs=2.0)
    assert not any(x.active for x in decisions[end:])
    short = Detector(stages(period_s=0.5, **level), policy())
    brief = run(short, [0.1] * 1000 + [5.0] * 150 + [0.1] * 100)  # 75 s: a fault, not a level
    (_, _), (end, kind) = edges(brief)
    assert end > 1150 and not brief[end].new_normal


def test_the_level_window_survives_a_snapshot() -> None:
    level = dict(new_level_s=100.0, baseline_refresh=1, baseline_seed=0.1)
    d = Detector(stages(**level), policy())
    run(d, [0.1] * 30 + [5.0] * 60)
    again = Detector(stages(**level), policy())
    again.restore(json.loads(json.dumps(d.snapshot())))
    assert again.threshold == d.threshold > 1.0
    assert [x.active for x in run(again, [5.0] * 20)] == [x.active for x in run(d, [5.0] * 20)]


def test_a_config_can_turn_the_moving_thresholds_off_or_change_them() -> None:
    from daemon.config import apply_alarm_overrides, load_config

    shipped = stages(baseline_samples=2100, new_level_s=800.0, baseline_rule="nonparametric")
    overrides = {"model.path": "m.onnx", "alarm.new_level_s": 0, "alarm.baseline_samples": 50}
    alarm = load_config(None, overrides).alarm
    changed = shipped.overridden(alarm)
    assert changed.detection.new_level_s is None and changed.detection.baseline_samples == 50
    assert changed.detection.baseline_rule == "nonparametric" and changed.model_id == "model-a"
    assert shipped.overridden(None) is shipped
    assert apply_alarm_overrides(policy(), alarm) == policy()  # not policy fields
    d = Detector(changed, policy())
    decisions = run(d, [0.1] * 100 + [5.0] * 3000)  # with new_level_s 0 a level stays in alarm
    assert decisions[-1].active and not any(x.new_normal for x in decisions)


def test_a_fault_that_clears_by_itself_is_not_flagged_as_new_normal() -> None:
    d = Detector(stages(new_normal_s=300.0, **ADAPTIVE), policy())
    decisions = run(d, [0.1] * 100 + [5.0] * 50 + [0.1] * 50)
    (_, _), (end, kind) = edges(decisions)
    assert kind is Transition.END and not decisions[end].new_normal


def test_time_constants_are_seconds_whatever_the_hop() -> None:
    """The same data time to accept a new normal at hop 1 and hop 4 (a window per 4 samples)."""
    accepted_s = []
    for hop in (1, 4):
        d = Detector(stages(new_normal_s=120.0, **ADAPTIVE), policy(hop=hop))
        decisions = run(d, [0.1] * (400 // hop) + [5.0] * (1000 // hop))
        (start, _), (end, _) = edges(decisions)
        accepted_s.append((end - start + 1) * hop)
    assert accepted_s == [120, 120]


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_a_windows_combined_score_does_not_depend_on_its_batch(combine: str) -> None:
    rng = np.random.default_rng(2)
    channel = rng.exponential(0.3, (257, 7))
    d = Detection(error="root", normalise=True, channel_level=[0.4] * 7, combine=combine)
    whole = combine_errors(d, channel.mean(axis=1), channel)
    for size in (1, 2, 64):
        parts = [
            combine_errors(d, channel[i : i + size].mean(axis=1), channel[i : i + size])
            for i in range(0, len(channel), size)
        ]
        assert np.array_equal(np.concatenate(parts), whole)


def test_snapshot_and_restore_round_trip_through_json() -> None:
    st = stages(new_normal_s=600.0, **ADAPTIVE)
    rng = np.random.default_rng(3)
    scores = np.r_[rng.exponential(0.1, 300), np.full(40, 4.0), rng.exponential(0.1, 200)]
    a = Detector(st, policy(smoothing_alpha=0.4))
    run(a, scores[:320])  # in alarm now
    assert a.active
    b = Detector(st, policy(smoothing_alpha=0.4))
    b.restore(json.loads(json.dumps(a.snapshot())))
    assert run(a, scores[320:]) == run(b, scores[320:])


def test_a_snapshot_of_another_model_is_refused() -> None:
    a = Detector(stages(), policy())
    other = Detector(Stages(Detection(), 1.0, "model-b"), policy())
    with pytest.raises(SnapshotError, match="another model"):
        other.restore(a.snapshot())
    with pytest.raises(SnapshotError, match="malformed"):
        a.restore({"version": 1, "model": "model-a"})


def test_follow_keeps_the_alarm_across_a_model_swap_and_ends_it_properly() -> None:
    old = Detector(stages(**ADAPTIVE), policy())
    run(old, [0.1] * 50 + [5.0] * 10)
    assert old.active
    # The new model's scores are on another scale: its own calibrated thresholds apply.
    other = Stages(Detection(), 1.0, "model-b")
    new = Detector(other, policy(enter_threshold=10, exit_threshold=5))
    new.follow(old)
    assert new.active
    decisions = run(new, [1.0, 1.0])
    assert edges(decisions) == [(1, Transition.END)]


def test_trailing_baseline_keeps_the_newest_values_through_a_snapshot() -> None:
    b = TrailingBaseline(size=5, refresh=1, seed=0.0)
    for v in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]:
        b.add(v)
    assert b.level == pytest.approx(5.0)
    smaller = TrailingBaseline(size=3, refresh=1, seed=0.0)
    smaller.restore(b.snapshot())
    smaller.add(8.0)  # replaces the oldest kept value (5.0): 6, 7, 8
    assert smaller.level == pytest.approx(7.0)


def test_detection_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="channel_level"):
        Detection(channel_level=[0.1, 0.0])
    with pytest.raises(ValueError, match="baseline_samples"):
        Detection(new_normal_s=60.0)


WARM = dict(ADAPTIVE, warmup_s=100.0)  # 200 windows of 0.5 s


def test_a_new_stream_learns_its_level_during_the_warm_up_before_it_is_judged() -> None:
    # A stream that opens at 3x the calibrated threshold: without a warm-up it alarms at once.
    cold = run(Detector(stages(period_s=0.5, **ADAPTIVE), policy()), [3.0] * 400)
    assert edges(cold)[0] == (2, Transition.START)
    warm = run(Detector(stages(period_s=0.5, **WARM), policy()), [3.0] * 400 + [20.0] * 10)
    assert not any(d.active for d in warm[:400])  # its level is its normal: 2 x 3.0 > 3.0
    assert warm[199].threshold == pytest.approx(6.0)
    assert edges(warm) == [(402, Transition.START)]  # a fault after the warm-up alarms


def test_the_warm_up_is_once_per_stream_not_per_gap_and_survives_restarts_and_swaps() -> None:
    st = stages(period_s=0.5, **WARM)
    d = Detector(st, policy())
    run(d, [0.1] * 250)
    d.reset()  # a gap
    assert edges(run(d, [5.0] * 3)) == [(2, Transition.START)]
    halfway = Detector(st, policy())
    run(halfway, [0.1] * 150)
    restored = Detector(st, policy())
    restored.restore(json.loads(json.dumps(halfway.snapshot())))
    assert not any(x.active for x in run(restored, [5.0] * 50))  # 50 more warm-up windows
    assert run(restored, [5.0] * 3)[-1].active
    old = halfway.snapshot()
    del old["seen"]  # a snapshot from before the warm-up: that stream was already judged
    judged = Detector(st, policy())
    judged.restore(old)
    assert run(judged, [5.0] * 3)[-1].active
    swapped = Detector(Stages(st.detection, 0.5, "model-b"), policy())
    swapped.follow(d)  # the stream was warm: the new model judges it at once
    assert run(swapped, [5.0] * 3)[-1].active
