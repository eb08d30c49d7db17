"""The recording store: batched writes, marks of alarm / muted / stale periods, size and age caps.

Real SQLite files in a temporary directory; the streams are plain `Stream` objects driven by hand
(the daemon drives them in tests/integration/test_retrain_daemon.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from daemon.alarm import AlarmTracker
from daemon.config import RecordSection
from daemon.intake import Work, new_layout
from daemon.manifest import AlarmPolicy
from daemon.metrics import Metrics
from daemon.reading import ChannelSample, ParsedReading
from daemon.recorder import Recorder
from daemon.recording import FILE_NAME, RecordingError, read
from daemon.stream import Alarm, Peak, Stream, new_buffer

CHANNELS = ["a", "b", "c"]
NOW = time.time()

LAYOUT = new_layout(["a", "b", "c"])
ZEROS = np.zeros(3)


def make(tmp_path: Path, **cfg: object) -> tuple[Recorder, Metrics]:
    metrics = Metrics()
    recorder = Recorder(RecordSection(**cfg), tmp_path, metrics)
    recorder.use_layout(CHANNELS, 1.0)
    return recorder, metrics


def work(stream: str, t0: float, n: int) -> Work:
    rows = [
        ParsedReading(t0 + i, None, np.array([i, 2.0 * i, -1.0], dtype=np.float64))
        for i in range(n)
    ]
    return Work(stream, rows, LAYOUT, size=len(rows))


def stream(name: str) -> Stream:
    policy = AlarmPolicy(enter_threshold=1.0, exit_threshold=0.5)
    buffer = new_buffer(window=4, channels=3, period_s=1.0, hop=1, max_gap_s=5.0, reorder_s=0.0)
    return Stream(name, buffer, AlarmTracker(policy))


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_only_chosen_streams_are_recorded_in_one_transaction_per_flush(tmp_path: Path) -> None:
    recorder, metrics = make(tmp_path, streams=["pump-*", "fan-2"])
    for name in ("pump-1", "pump-2", "fan-1", "fan-2"):
        recorder.record(work(name, NOW - 100, 10))
    recorder.record(Work("pump-1", None, LAYOUT, channel=1, sample=ChannelSample(NOW - 50, 7.5)))
    recorder.flush({})
    recorder.close()
    got = {(r.stream, len(r.ts)) for r in read(tmp_path / FILE_NAME)}
    assert got == {("pump-1", 11), ("pump-2", 10), ("fan-2", 10)}
    pump = next(r for r in read(tmp_path / FILE_NAME) if r.stream == "pump-1")
    assert pump.channels == CHANNELS
    np.testing.assert_array_equal(pump.values[3], [3.0, 6.0, -1.0])
    # The per-channel sample carries only its own channel.
    assert np.isnan(pump.values[-1, 0]) and pump.values[-1, 1] == 7.5
    assert counter(metrics, "oteo_recorder_readings_total") == 31


def test_alarm_muted_and_stale_periods_are_marked(tmp_path: Path) -> None:
    recorder, _ = make(tmp_path, streams=["p"])
    s = stream("p")
    s.last_ts = NOW - 100
    recorder.flush({"p": s})  # normal: nothing marked
    s.alarm = Alarm.begin(Peak(3.0, NOW - 95, ZEROS, ZEROS, ZEROS))
    s.last_ts = NOW - 90
    recorder.flush({"p": s})
    s.alarm = None
    s.state, s.state_since_ts, s.last_ts = "normal", NOW - 80, NOW - 80
    recorder.flush({"p": s})
    s.state, s.state_since_ts, s.last_ts = "muted", NOW - 70, NOW - 70
    recorder.flush({"p": s})
    s.last_ts = NOW - 60
    s.state, s.state_since_ts = "stale", NOW - 60
    recorder.flush({"p": s})
    recorder.record(work("p", NOW - 100, 40))
    recorder.close()  # closes the open stale mark at the stream's last data time
    (rec,) = read(tmp_path / FILE_NAME)
    assert [(m.state, m.start_ts, m.end_ts) for m in rec.marks] == [
        ("alarm", NOW - 95, NOW - 80),
        ("muted", NOW - 70, NOW - 60),
        ("stale", NOW - 60, NOW - 60),
    ]


def test_store_stays_within_its_size_cap_dropping_the_oldest(tmp_path: Path) -> None:
    recorder, metrics = make(tmp_path, streams=["*"], max_mb=0.25)
    t0 = NOW - 20_000
    for second in range(0, 20_000, 500):  # 40 flushes of 500 readings: ~3x the cap
        recorder.record(work("p", t0 + second, 500))
        recorder.flush({})
        # The daemon flushes once a second, and the writer keeps up with that: here, the next
        # flush waits until the writer has taken this one (a queue overflow would drop readings).
        deadline = time.monotonic() + 10
        while recorder.backlog:
            assert time.monotonic() < deadline, "the writer did not take a batch in 10 s"
            time.sleep(0.005)
    recorder.close()
    path = tmp_path / FILE_NAME
    assert path.stat().st_size <= 0.25 * 1024 * 1024
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size <= 1024 * 1024
    (rec,) = read(path)
    deleted = counter(metrics, "oteo_recorder_deleted_total", reason="size")
    dropped = counter(metrics, "oteo_recorder_dropped_total")
    assert deleted > 0 and len(rec.ts) + deleted + dropped == 20_000
    # The oldest went first: what is left is the most recent, without holes.
    assert rec.ts[-1] == t0 + 19_999
    np.testing.assert_array_equal(np.diff(rec.ts), 1.0)


def test_readings_older_than_max_age_are_deleted(tmp_path: Path) -> None:
    recorder, metrics = make(tmp_path, streams=["*"], max_age_h=1.0)
    recorder.record(work("p", NOW - 7200, 100))  # two hours old
    recorder.record(work("p", NOW - 600, 100))
    recorder.flush({})
    recorder.close()
    (rec,) = read(tmp_path / FILE_NAME)
    assert rec.ts.min() >= NOW - 3600
    assert counter(metrics, "oteo_recorder_deleted_total", reason="age") == 100


def test_a_model_with_other_channels_starts_a_new_layout(tmp_path: Path) -> None:
    recorder, _ = make(tmp_path, streams=["*"])
    recorder.record(work("p", NOW - 100, 5))
    recorder.use_layout(["x", "y", "z"], 1.0)
    recorder.record(work("p", NOW - 50, 5))
    recorder.flush({})
    recorder.close()
    assert [r.channels for r in read(tmp_path / FILE_NAME)] == [CHANNELS, ["x", "y", "z"]]


def test_unreadable_store_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(RecordingError, match=r"bad\.sqlite3"):
        read(bad)
    with pytest.raises(RecordingError, match="no such recording"):
        read(tmp_path / "missing.sqlite3")


def test_a_store_being_written_reads_consistently(tmp_path: Path) -> None:
    """oteo retrain may read the live file: flushed readings are there, still in the WAL."""
    recorder, metrics = make(tmp_path, streams=["*"])
    recorder.record(work("p", NOW - 100, 30))
    recorder.flush({})
    deadline = time.monotonic() + 5
    while counter(metrics, "oteo_recorder_readings_total") < 30:  # counted after COMMIT
        assert time.monotonic() < deadline, "the writer did not commit"
        time.sleep(0.01)
    (rec,) = read(tmp_path / FILE_NAME)
    assert len(rec.ts) == 30
    recorder.close()
