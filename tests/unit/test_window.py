"""Stream buffers and channel alignment: grid, gaps, duplicates, reordering, windows."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.aligner import ChannelAligner
from daemon.window import PushResult, StreamBuffer

T0 = 1_700_000_000.0
P = 0.5  # sample period (s)


def buffer(
    window: int = 4,
    channels: int = 2,
    hop: int = 2,
    max_gap_s: float = 5 * P,
    reorder_tolerance_s: float = 0.0,
) -> StreamBuffer:
    return StreamBuffer(
        window,
        channels,
        hop=hop,
        period_s=P,
        max_gap_s=max_gap_s,
        reorder_tolerance_s=reorder_tolerance_s,
    )


def row(i: float, channels: int = 2) -> np.ndarray:
    """Distinct, recognisable values for sample i: [i, 10 i, 20 i, ...]."""
    return i * np.array([1.0] + [10.0 * c for c in range(1, channels)])


def push(buf: StreamBuffer, i: float, seq: int | None = None) -> PushResult:
    return buf.push(T0 + i * P, row(i, buf.channels), seq).result


def test_window_ready_exactly_at_window_samples_then_every_hop() -> None:
    buf = buffer(window=4, hop=3)
    ready = [buf.push(T0 + i * P, row(i)).windows_ready for i in range(14)]
    assert ready == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert buf.filled_since_reset == 14
    assert buf.last_ts == T0 + 13 * P


def test_take_is_chronological_after_the_ring_wraps() -> None:
    buf = buffer(window=5, channels=3, hop=1)
    for i in range(57):  # many times the ring's length
        buf.push(T0 + i * P, row(i, 3))
    expected = np.stack([row(i, 3) for i in range(52, 57)]).astype(np.float32)
    np.testing.assert_array_equal(buf.take(), expected)
    out = np.zeros((5, 3), dtype=np.float32)
    assert buf.take(out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_short_gap_filled_by_interpolation_and_counted_towards_hop() -> None:
    buf = buffer(window=4, hop=3, max_gap_s=4 * P)
    for i in range(4):
        buf.push(T0 + i * P, row(i))
    out = buf.push(T0 + 7 * P, row(7))  # 4 periods later: samples 4, 5, 6 are missing
    assert out.result is PushResult.ACCEPTED
    assert out.filled == 3
    assert out.windows_ready == 1  # at sample 6, 3 after the first window (samples 0-3)
    assert buf.filled_since_reset == 8
    # Linear data, so interpolation gives the missing rows exactly.
    np.testing.assert_allclose(buf.take_at(0), np.stack([row(i) for i in range(3, 7)]))
    np.testing.assert_allclose(buf.take(), np.stack([row(i) for i in range(4, 8)]))
    assert [buf.push(T0 + i * P, row(i)).windows_ready for i in (8, 9, 10, 11, 12)] == [
        0,
        1,
        0,
        0,
        1,
    ]


def test_interpolated_values_are_linear_between_neighbours() -> None:
    buf = buffer(window=5, channels=2, hop=1, max_gap_s=4 * P)
    buf.push(T0, np.array([1.0, -4.0]))
    assert buf.push(T0 + 4 * P, np.array([5.0, 4.0])).filled == 3
    expected = [[1.0, -4.0], [2.0, -2.0], [3.0, 0.0], [4.0, 2.0], [5.0, 4.0]]
    np.testing.assert_allclose(buf.take(), expected)


def test_every_window_made_ready_by_a_fill_is_reachable_with_take_at() -> None:
    buf = buffer(window=3, hop=1, max_gap_s=6 * P)
    for i in range(3):
        buf.push(T0 + i * P, row(i))
    out = buf.push(T0 + 8 * P, row(8))
    assert out.windows_ready == 6
    for k in range(6):
        end = 8 - k
        expected = np.stack([row(i) for i in range(end - 2, end + 1)])
        np.testing.assert_allclose(buf.take_at(k), expected, rtol=1e-6)
    np.testing.assert_array_equal(buf.take_at(0), buf.take())
    with pytest.raises(IndexError):
        buf.take_at(6)


def test_gap_longer_than_max_gap_resets_the_window() -> None:
    buf = buffer(window=4, hop=1, max_gap_s=3 * P)
    for i in range(6):
        push(buf, i)
    out = buf.push(T0 + 10 * P, row(10))  # 5 periods > max_gap
    assert out.result is PushResult.GAP_RESET
    assert out.windows_ready == 0
    assert out.filled == 0
    assert buf.filled_since_reset == 1
    with pytest.raises(ValueError, match="since the last reset"):
        buf.take()
    ready = [buf.push(T0 + i * P, row(i)).windows_ready for i in range(11, 15)]
    assert ready == [0, 0, 1, 1]  # a full window again at the 4th sample after the hole
    np.testing.assert_array_equal(buf.take(), np.stack([row(i) for i in range(11, 15)]))


def test_gap_of_exactly_max_gap_is_filled_not_reset() -> None:
    buf = buffer(max_gap_s=3 * P)
    push(buf, 0)
    out = buf.push(T0 + 3 * P, row(3))
    assert out.result is PushResult.ACCEPTED
    assert out.filled == 2


def test_duplicate_seq_and_older_seq_dropped() -> None:
    buf = buffer()
    assert push(buf, 0, seq=10) is PushResult.ACCEPTED
    assert push(buf, 1, seq=11) is PushResult.ACCEPTED
    assert push(buf, 1, seq=11) is PushResult.DUPLICATE  # a QoS 1 redelivery
    assert push(buf, 0, seq=10) is PushResult.DUPLICATE
    assert buf.filled_since_reset == 2


def test_duplicate_by_timestamp_dropped() -> None:
    buf = buffer()
    push(buf, 0)
    push(buf, 1)
    push(buf, 2)
    assert buf.push(T0 + 2 * P + 0.4 * P, row(9)).result is PushResult.DUPLICATE
    assert push(buf, 1) is PushResult.DUPLICATE  # older, but a sample that was received
    assert buf.filled_since_reset == 3
    assert push(buf, 3) is PushResult.ACCEPTED


def test_replay_older_than_the_ring_is_duplicate_by_seq_late_without() -> None:
    buf = buffer(window=2, hop=1, max_gap_s=P)
    for i in range(100):
        push(buf, i, seq=i)
    assert push(buf, 3, seq=3) is PushResult.DUPLICATE
    assert push(buf, 3) is PushResult.LATE


def test_a_late_reading_says_whether_it_was_never_taken() -> None:
    # `missed`: its slot is in the ring and was interpolated. A partition's broker that
    # redelivers after newer readings makes these: the engine counts them as lost, not seen.
    buf = buffer(window=4, hop=1, max_gap_s=5 * P)
    push(buf, 0, seq=0)
    push(buf, 3, seq=3)  # 1 and 2 interpolated
    late = buf.push(T0 + 2 * P, row(2), 2)
    assert late.result is PushResult.LATE and late.missed
    seen = buf.push(T0, row(0), 0)
    assert seen.result is PushResult.DUPLICATE and not seen.missed
    for i in range(4, 40):
        push(buf, i)
    old = buf.push(T0 + P, row(1))  # beyond the ring, no seq: late, but not known as missed
    assert old.result is PushResult.LATE and not old.missed
    # With seq, beyond the ring: a seq the stream skipped was never taken.
    push(buf, 40, seq=40)
    push(buf, 45, seq=45)  # 41..44 missing by seq (and interpolated)
    for i in range(46, 90):
        push(buf, i, seq=i)
    skipped = buf.push(T0 + 42 * P, row(42), 42)
    assert skipped.result is PushResult.LATE and skipped.missed
    again = buf.push(T0 + 47 * P, row(47), 47)
    assert again.result is PushResult.DUPLICATE and not again.missed
    # A sender that restarts its counter: its old gaps say nothing about the new seqs.
    push(buf, 90, seq=0)
    for i in range(91, 140):
        push(buf, i, seq=i - 90)
    assert buf.push(T0 + 92 * P, row(92), 42).result is PushResult.DUPLICATE


def test_seq_gap_counted_and_reading_still_used() -> None:
    buf = buffer()
    buf.push(T0, row(0), seq=1)
    out = buf.push(T0 + P, row(1), seq=5)
    assert out.result is PushResult.ACCEPTED
    assert out.seq_gap == 3
    assert buf.push(T0 + 2 * P, row(2), seq=6).seq_gap == 0


def test_seq_restart_on_a_newer_reading_is_accepted_without_gap() -> None:
    buf = buffer()
    push(buf, 0, seq=500)
    out = buf.push(T0 + P, row(1), seq=0)  # the sender restarted its counter
    assert out.result is PushResult.ACCEPTED
    assert out.seq_gap == 0
    assert buf.push(T0 + 2 * P, row(2), seq=1).seq_gap == 0


def test_late_reading_dropped_with_zero_tolerance() -> None:
    buf = buffer()
    push(buf, 0)
    push(buf, 3)  # samples 1 and 2 interpolated
    assert push(buf, 2) is PushResult.LATE
    assert buf.last_ts == T0 + 3 * P
    assert buf.filled_since_reset == 4


def test_out_of_order_readings_within_tolerance_committed_in_time_order() -> None:
    order = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 10, 11, 12]
    buf = buffer(window=4, hop=1, reorder_tolerance_s=2 * P)
    ready = 0
    windows = []
    for i in order:
        out = buf.push(T0 + i * P, row(i))
        assert out.result is PushResult.ACCEPTED
        assert out.filled == 0
        ready += out.windows_ready
        windows += [buf.take_at(k) for k in reversed(range(out.windows_ready))]
    for out in buf.drain():
        ready += out.windows_ready
    assert buf.filled_since_reset == 13
    assert ready == 10
    np.testing.assert_array_equal(buf.take(), np.stack([row(i) for i in range(9, 13)]))
    for k, window in enumerate(windows):  # every window, in order, is the sorted one
        np.testing.assert_array_equal(window, np.stack([row(i) for i in range(k, k + 4)]))


def test_reading_later_than_the_tolerance_is_late() -> None:
    buf = buffer(reorder_tolerance_s=2 * P)
    for i in [0, 2, 3, 4, 5]:  # 1 not there when 3 is committed (5 - tolerance)
        push(buf, i)
    assert buf.last_ts == T0 + 3 * P
    assert push(buf, 1) is PushResult.LATE
    assert push(buf, 4) is PushResult.DUPLICATE  # held, not yet committed
    assert push(buf, 3) is PushResult.DUPLICATE  # committed


def test_held_readings_wait_for_the_tolerance_and_drain_releases_them() -> None:
    buf = buffer(window=2, hop=1, reorder_tolerance_s=3 * P)
    for i in range(3):
        assert buf.push(T0 + i * P, row(i)).windows_ready == 0
    assert buf.last_ts is None
    assert buf.drain(now_ts=T0 + 2.9 * P) == []  # nothing older than now - tolerance yet
    outcomes = buf.drain(now_ts=T0 + 4 * P)
    assert [o.windows_ready for o in outcomes] == [0, 1]
    np.testing.assert_array_equal(buf.take_at(0), np.stack([row(0), row(1)]))
    assert [o.windows_ready for o in buf.drain()] == [1]
    assert buf.last_ts == T0 + 2 * P


def test_jitter_below_half_a_period_does_not_shift_the_grid() -> None:
    buf = buffer(window=3, hop=1)
    jitter = [0.0, 0.45, -0.45, 0.3, 0.49, -0.49, 0.1]
    for i, j in enumerate(jitter):
        out = buf.push(T0 + (i + j) * P, row(i))
        assert out.result is PushResult.ACCEPTED
        assert out.filled == 0
        assert buf.last_ts == T0 + i * P
    np.testing.assert_array_equal(buf.take(), np.stack([row(i) for i in range(4, 7)]))


def test_float32_values_accepted_and_wrong_shape_refused() -> None:
    buf = buffer(window=1, hop=1)
    assert buf.push(T0, row(1).astype(np.float32)).windows_ready == 1
    with pytest.raises(ValueError, match="shape"):
        buf.push(T0 + P, np.zeros(1))


def test_reset_forgets_everything() -> None:
    buf = buffer(reorder_tolerance_s=P)
    for i in range(5):
        push(buf, i, seq=i)
    buf.reset()
    assert buf.last_ts is None
    assert buf.filled_since_reset == 0
    assert buf.drain() == []
    assert push(buf, 0, seq=0) is PushResult.ACCEPTED


@pytest.mark.parametrize("seed", range(12))
def test_window_equals_reference_for_in_order_readings(seed: int) -> None:
    """Random shapes, values and jitter; with a tolerance, arrival order is shuffled within it."""
    rng = np.random.default_rng(seed)
    window, hop, channels = (int(x) for x in rng.integers(1, 9, size=3))
    period = float(rng.choice([0.01, 0.1, 1.0, 2.5]))
    tolerance = 3 * period if seed % 2 else 0.0
    buf = StreamBuffer(
        window,
        channels,
        hop=hop,
        period_s=period,
        max_gap_s=5 * period,
        reorder_tolerance_s=tolerance,
    )
    n = 300
    values = rng.normal(size=(n, channels)) * 10.0 ** rng.integers(-3, 4, size=(n, 1))
    ts = T0 + (np.arange(n) + rng.uniform(-0.24, 0.24, size=n)) * period  # under P/2 apart
    arrival = np.argsort(np.arange(n) + (rng.uniform(0, 2, size=n) if tolerance else 0))
    got: list[np.ndarray] = []
    for i in arrival:
        out = buf.push(float(ts[i]), values[i], seq=int(i))
        assert out.result is PushResult.ACCEPTED
        assert out.filled == 0
        got += [buf.take_at(k) for k in reversed(range(out.windows_ready))]
    drained = sum(out.windows_ready for out in buf.drain())
    got += [buf.take_at(k) for k in reversed(range(drained))]
    reference = values.astype(np.float32)  # every row in time order, a window every hop
    expected = [reference[end - window : end] for end in range(window, n + 1, hop)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# -- channel alignment -------------------------------------------------------------------------


def test_channels_at_the_same_rate_give_one_row_per_slot() -> None:
    al = ChannelAligner(3, period_s=P)
    rows = []
    for i in range(5):
        for c in range(3):
            got = al.push(c, T0 + i * P + 0.01 * c, 100 * c + i)
            assert len(got) == (1 if c == 2 else 0)  # out as soon as the slot is complete
            rows += got
    assert [ts for ts, _ in rows] == [T0 + i * P for i in range(5)]
    np.testing.assert_array_equal(np.stack([v for _, v in rows])[:, 1], 100 + np.arange(5))
    assert al.incomplete == 0
    assert al.late == 0


def test_slow_channel_is_held_between_its_samples() -> None:
    al = ChannelAligner(2, period_s=P)
    rows = []
    for i in range(12):
        rows += al.push(0, T0 + i * P, float(i))
        if i % 3 == 0:
            rows += al.push(1, T0 + i * P, 1000.0 + i)
    rows += al.flush(T0 + 20 * P)
    values = np.stack([v for _, v in rows])
    np.testing.assert_array_equal(values[:, 0], np.arange(12))
    np.testing.assert_array_equal(values[:, 1], 1000 + 3 * (np.arange(12) // 3))
    assert [ts for ts, _ in rows] == [T0 + i * P for i in range(12)]
    assert al.incomplete == 0


def test_channel_silent_longer_than_hold_makes_rows_incomplete() -> None:
    al = ChannelAligner(2, period_s=P, hold_s=2 * P)
    rows = al.push(0, T0, 0.0) + al.push(1, T0, 1.0)
    for i in range(1, 8):  # channel 1 goes silent
        rows += al.push(0, T0 + i * P, float(i))
    rows += al.flush(T0 + 20 * P)
    assert [ts for ts, _ in rows] == [T0 + i * P for i in range(3)]  # held for 2 periods
    assert al.incomplete == 5


def test_flush_emits_incomplete_slots_only_after_max_wait() -> None:
    al = ChannelAligner(2, period_s=P, max_wait_s=2 * P)
    al.push(0, T0, 0.0)
    al.push(1, T0, 1.0)
    assert al.push(0, T0 + P, 2.0) == []  # channel 1 may still come
    assert al.flush(T0 + 3 * P) == []  # slot 1 is exactly max_wait old: not yet
    rows = al.flush(T0 + 3.01 * P)
    assert len(rows) == 1
    ts, values = rows[0]
    assert ts == T0 + P
    np.testing.assert_array_equal(values, [2.0, 1.0])  # channel 1 held


def test_the_first_value_of_a_channel_in_a_slot_wins() -> None:
    al = ChannelAligner(2, period_s=P)
    al.push(0, T0, 1.0)  # anchors the grid
    al.push(0, T0 + 0.2 * P, 3.0)  # same slot: a re-delivery or jitter
    ((ts, values),) = al.push(1, T0 - 0.3 * P, 7.0)
    assert ts == T0 and al.duplicates == 1
    np.testing.assert_array_equal(values, [1.0, 7.0])


def test_the_grid_is_anchored_at_the_first_value() -> None:
    al = ChannelAligner(1, period_s=P)
    rows = [r for i in range(3) for r in al.push(0, T0 + 0.4 * P + i * P, float(i))]
    assert [ts for ts, _ in rows] == [T0 + 0.4 * P + i * P for i in range(3)]


def test_value_for_an_emitted_slot_is_late() -> None:
    al = ChannelAligner(2, period_s=P)
    al.push(0, T0, 1.0)
    al.push(1, T0, 2.0)
    assert al.push(0, T0 + 0.1 * P, 5.0) == []
    assert al.late == 1


def test_pending_slots_stay_bounded() -> None:
    al = ChannelAligner(2, period_s=P, max_wait_s=3 * P)
    for i in range(1000):  # channel 1 never arrives
        al.push(0, T0 + i * P, float(i))
        assert len(al._pending) <= 3 + 2
    assert al.incomplete == 1000 - len(al._pending)
