"""Hostile input at unit level (issue 6, item 9): the daemon's real intake path, no broker.

`Daemon.intake.offer` is what the MQTT network thread calls for every message: topic checks,
`ReadingParser`, the bounded ingest queue. `Daemon._drain` is what the main loop runs: `Engine`
(stream buffers, micro-batched scoring, alarms, events). Both are driven here by plain calls on a
`Daemon` that is built (demo model loaded, outbox opened) but never started: no thread, no
socket. The model is wrapped so that every batch it is given is recorded: "none reaches the
model" is checked on what onnxruntime actually received.

Then two hypothesis tests: a property test of `ReadingParser` (it never raises anything but
`PayloadError`; what it accepts is finite and has the right shape and the values sent) and a
state machine over `StreamBuffer` (append, duplicate, reorder, gap, drain: every window is
fixed-size, finite and in time order).

Duplicate JSON keys: pydantic's JSON parser (jiter) keeps the LAST value of a repeated key,
silently, as json.loads and orjson do. oteo documents this rather than paying for a parser that
detects duplicates; `test_duplicate_json_keys_last_value_wins` pins the behaviour.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from daemon.config import load_config
from daemon.model import Model, ScoreBatch
from daemon.mqtt import Incoming
from daemon.reading import UNIX_TS_MAX, ParsedReading, PayloadError, ReadingParser
from daemon.service import Daemon
from daemon.window import PushOutcome, PushResult, StreamBuffer

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo.onnx"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, data time of a stream's first reading
MAX_PAYLOAD = 4096
MAX_BATCH = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)


# -- fixtures ----------------------------------------------------------------------------------


class RecordingModel:
    """The real model, with every batch it scores recorded (a copy) for inspection."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.batches: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def run(self, windows: np.ndarray) -> ScoreBatch:
        self.batches.append(np.array(windows, copy=True))
        return self._model.run(windows)

    def windows(self) -> int:
        return sum(len(b) for b in self.batches)


class Intake:
    """A built, never started Daemon, driven by direct calls; counters read from its registry."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.model = RecordingModel(daemon.engine.model)
        daemon.engine.use_model(self.model)  # type: ignore[arg-type]
        self.manifest = daemon.model.manifest
        self.channels = list(self.manifest.channels)
        self.mean = list(self.manifest.channel_mean)
        self._mid = 0

    def offer(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """What the network thread does with one message; True = taken (acknowledged)."""
        self._mid += 1
        msg = Incoming(topic, payload, qos, False, self._mid, None)
        return self.daemon.intake.offer(msg)

    def drain(self) -> None:
        """What the main loop does with the queue: every reading handled, windows scored."""
        self.daemon.drain.run(timeout_s=0.0, until_empty=True)
        self.daemon.engine.score_pending()

    def forget(self) -> None:
        """Back to no queued message, no stream, no recorded batch (counters stay)."""
        while not self.daemon.intake.queue.empty():
            self.daemon.intake.queue.get_nowait()
        self.daemon.engine._batch.items.clear()
        self.daemon.engine.streams.clear()
        self.model.batches.clear()

    def value(self, name: str, **labels: str) -> float:
        got = self.daemon.metrics.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    def results(self) -> dict[str, float]:
        """oteo_messages_total by result."""
        out: dict[str, float] = {}
        for family in self.daemon.metrics.registry.collect():
            if family.name == "oteo_messages":
                for sample in family.samples:
                    if sample.name == "oteo_messages_total":
                        out[sample.labels["result"]] = sample.value
        return out

    def reading(
        self, ts: Any, seq: int | None = None, values: list[Any] | None = None, **extra: Any
    ) -> bytes:
        doc: dict[str, Any] = {"ts": ts, "values": self.mean if values is None else values}
        if seq is not None:
            doc["seq"] = seq
        doc.update(extra)
        return json.dumps(doc).encode()

    def feed(self, stream: str, n: int, *, start: int = 0, seq: bool = True) -> None:
        """`n` in-order readings (1 s apart, seq = index) on `stream`, then drained."""
        for i in range(start, start + n):
            taken = self.offer(
                f"sensors/{stream}/data", self.reading(T0 + i, i if seq else None, self.row(i))
            )
            assert taken
        self.drain()

    def row(self, i: int) -> list[float]:
        """A plausible reading: the training mean plus a small deterministic wiggle."""
        pairs = zip(self.mean, self.manifest.channel_scale, strict=True)
        return [m + 0.1 * s * math.sin(0.3 * i + c) for c, (m, s) in enumerate(pairs)]


def make_daemon(tmp: Path, **overrides: Any) -> Daemon:
    cfg = load_config(
        None,
        {
            "model.path": str(DEMO_MODEL),
            "state_dir": str(tmp / "state"),
            "instance": "unit",
            "mqtt.url": "mqtt://127.0.0.1:1",  # never connected: the link is not started
            "http.port": 0,
            "ingest.max_payload_bytes": MAX_PAYLOAD,
            "ingest.max_batch_readings": MAX_BATCH,
            **overrides,
        },
    )
    return Daemon(cfg)


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    daemon = make_daemon(tmp_path)
    yield Intake(daemon)
    daemon.responder.close()
    daemon.outbox.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:
    """One intake for the table below (refused payloads change no stream state)."""
    daemon = make_daemon(tmp_path_factory.mktemp("hostile"))
    yield Intake(daemon)
    daemon.responder.close()
    daemon.outbox.close()


# -- the table of malformed payloads -------------------------------------------------------------

MEAN8 = "[25, 2, 50.7, 31, 4.2, 36.7, 2142, 7.8]"  # 8 values, as many as the demo model has


def reading_text(ts: str = "1767225600", values: str = MEAN8, extra: str = "") -> bytes:
    return f'{{"ts": {ts}, "values": {values}{extra}}}'.encode()


def first(value: str) -> bytes:
    """A reading whose first value is the JSON text `value`."""
    return reading_text(values="[" + value + ", 2, 50.7, 31, 4.2, 36.7, 2142, 7.8]")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE: list[tuple[str, str, str, bytes]] = [
    # (case id, expected oteo_messages_total result, stream topic, payload)
    # Not JSON at all.
    ("text", "not_json", "s", b"hello"),
    ("truncated", "not_json", "s", reading_text()[:-3]),
    ("trailing-garbage", "not_json", "s", reading_text() + b" x"),
    ("single-quotes", "not_json", "s", b"{'ts': 1767225600, 'values': [1]}"),
    ("binary", "not_json", "s", bytes(range(256))[:64]),
    ("nul-bytes", "not_json", "s", b"\x00" * 32),
    ("bom-then-json", "not_json", "s", b"\xef\xbb\xbf" + reading_text()),
    # Not UTF-8 / broken escapes.
    ("latin1-in-string", "not_json", "s", b'{"ts": 1767225600, "values": "\xe9t\xe9"}'),
    ("bad-utf8-key", "not_json", "s", b'{"t\xc3\x28": 1}'),
    ("overlong-utf8", "not_json", "s", b'{"ts": "\xc0\xaf"}'),
    ("lone-surrogate", "not_json", "s", b'{"\\ud800": 1}'),
    # Empty and top-level shapes that are not a reading.
    ("empty", "not_json", "s", b""),
    ("whitespace", "not_json", "s", b" \n\t "),
    ("null", "bad_schema", "s", b"null"),
    ("true", "bad_schema", "s", b"true"),
    ("string", "bad_schema", "s", b'"25.0"'),
    ("number", "bad_schema", "s", b"25.0"),
    ("array-of-numbers", "bad_schema", "s", b"[1, 2, 3]"),
    ("array-of-null", "bad_schema", "s", b"[null]"),
    ("array-of-arrays", "bad_schema", "s", b"[[1767225600, 1, 2]]"),
    ("empty-object", "bad_schema", "s", b"{}"),
    ("empty-array", "empty_batch", "s", b"[]"),
    # Wrong types where numbers belong.
    ("values-null", "bad_schema", "s", reading_text(values="null")),
    ("values-number", "bad_schema", "s", reading_text(values="25")),
    ("values-string", "bad_schema", "s", reading_text(values='"25,2,50"')),
    ("value-string-number", "bad_type", "s", first('"25.0"')),
    ("value-boolean", "bad_type", "s", first("true")),
    ("value-null", "bad_type", "s", first("null")),
    ("value-object", "bad_type", "s", first('{"v": 25}')),
    ("value-array", "bad_type", "s", first("[25]")),
    ("value-hex-string", "bad_type", "s", first('"0x19"')),
    ("value-NaN-string", "bad_type", "s", first('"NaN"')),
    ("ts-boolean", "bad_timestamp", "s", reading_text(ts="true")),
    ("ts-null", "bad_timestamp", "s", reading_text(ts="null")),
    ("ts-array", "bad_timestamp", "s", reading_text(ts="[1767225600]")),
    ("ts-numeric-string", "bad_timestamp", "s", reading_text(ts='"1767225600"')),
    ("seq-float", "bad_type", "s", reading_text(extra=', "seq": 1.0')),
    ("seq-string", "bad_type", "s", reading_text(extra=', "seq": "1"')),
    ("seq-boolean", "bad_type", "s", reading_text(extra=', "seq": true')),
    ("seq-negative", "bad_type", "s", reading_text(extra=', "seq": -1')),
    # Not finite, or not representable in the model's float32 input.
    ("NaN", "non_finite", "s", first("NaN")),
    ("Infinity", "non_finite", "s", first("Infinity")),
    ("-Infinity", "non_finite", "s", first("-Infinity")),
    ("1e999", "non_finite", "s", first("1e999")),
    ("-1e999", "non_finite", "s", first("-1e999")),
    ("400-digit-int", "non_finite", "s", first("1" + "0" * 400)),
    # Finite as a double, infinite as the float32 the model takes: must not reach the model.
    ("1e39-beyond-float32", "non_finite", "s", first("1e39")),
    # Wrong number of values, unknown and missing channels.
    ("no-values", "wrong_length", "s", reading_text(values="[]")),
    ("7-values", "wrong_length", "s", reading_text(values="[1, 2, 3, 4, 5, 6, 7]")),
    ("9-values", "wrong_length", "s", reading_text(values="[1, 2, 3, 4, 5, 6, 7, 8, 9]")),
    ("500-values", "wrong_length", "s", reading_text(values=json.dumps([1.0] * 500))),
    ("named-unknown", "unknown_channel", "s", reading_text(values='{"rpm": 1}')),
    ("named-empty", "missing_channel", "s", reading_text(values="{}")),
    # Deep nesting: refused by the decoder's depth limit or by the schema, never a RecursionError.
    ("nested-2000", "not_json", "s", nested(2000)),
    ("nested-in-values", "bad_type", "s", first("[" * 100 + "1" + "]" * 100)),
    ("nested-objects", "not_json", "s", b'{"a":' * 500 + b"1" + b"}" * 500),
    # Size and batch caps.
    ("huge-payload", "too_large", "s", b" " * (16 * 1024 * 1024) + reading_text()),
    ("just-too-large", "too_large", "s", reading_text() + b" " * MAX_PAYLOAD),
    ("batch-over-cap", "batch_too_large", "s", b"[" + b",".join([reading_text()] * 9) + b"]"),
    ("batch-with-junk", "bad_schema", "s", b"[" + reading_text() + b", 7]"),
    # Timestamps the parser can judge on their own.
    ("ts-negative", "bad_timestamp", "s", reading_text(ts="-1")),
    ("ts-milliseconds", "bad_timestamp", "s", reading_text(ts="1767225600000")),
    ("ts-huge-int", "bad_timestamp", "s", reading_text(ts="1" + "0" * 400)),
    ("ts-NaN", "bad_timestamp", "s", reading_text(ts="NaN")),
    ("ts-Infinity", "bad_timestamp", "s", reading_text(ts="Infinity")),
    ("ts-year-9999", "bad_timestamp", "s", reading_text(ts='"9999-12-31T23:59:59Z"')),
    ("ts-year-0", "bad_timestamp", "s", reading_text(ts='"0000-01-01T00:00:00Z"')),
    ("ts-leap-second", "bad_timestamp", "s", reading_text(ts='"2026-06-30T23:59:60Z"')),
    ("ts-offset-99h", "bad_timestamp", "s", reading_text(ts='"2026-01-01T00:00:00+99:00"')),
    ("ts-no-offset", "bad_timestamp", "s", reading_text(ts='"2026-01-01T00:00:00"')),
    ("ts-words", "bad_timestamp", "s", reading_text(ts='"now"')),
    # Junk in the topic: no stream id, an over-long one, a topic shape that is not ours.
    ("no-stream-id", "unknown_stream_topic", "", reading_text()),
    ("stream-id-129", "unknown_stream_topic", "s" * 129, reading_text()),
    ("stream-id-129-multibyte", "unknown_stream_topic", "é" * 129, reading_text()),
    ("extra-level", "unknown_stream_topic", "s/data/x", reading_text()),
    ("ch-without-channel", "unknown_stream_topic", "s/ch", reading_text()),
    ("ch-two-levels", "unknown_stream_topic", "s/ch/a/b", reading_text()),
    ("unknown-channel-topic", "unknown_channel", "s/ch/no_such_channel", b"1.0"),
    ("channel-NaN", "non_finite", "s/ch/motor_current_a", b"NaN"),
    ("channel-string", "bad_type", "s/ch/motor_current_a", b'"1.0"'),
    ("channel-1e39", "non_finite", "s/ch/motor_current_a", b"1e39"),
]


def topic_for(stream: str) -> str:
    """`stream` may carry extra levels (`s/ch/x`): the case names the whole tail of the topic."""
    if "/" in stream:
        return f"sensors/{stream}"
    return f"sensors/{stream}/data"


@pytest.mark.parametrize(
    ("reason", "stream", "payload"),
    [pytest.param(r, s, p, id=case) for case, r, s, p in HOSTILE],
)
def test_hostile_payload_is_counted_under_its_reason_and_never_queued(
    shared: Intake, reason: str, stream: str, payload: bytes
) -> None:
    shared.forget()  # whatever an earlier (failed) case left behind
    before = shared.results()
    started = time.perf_counter()
    taken = shared.offer(topic_for(stream), payload)
    elapsed_s = time.perf_counter() - started
    after = shared.results()
    changed = {r: after[r] - before.get(r, 0.0) for r in after if after[r] != before.get(r, 0.0)}
    # Acknowledged (True): a refused message must not come back from the broker forever.
    assert taken is True
    assert changed == {reason: 1.0}, changed
    assert shared.daemon.intake.queue.empty(), "a refused payload was queued for the main loop"
    shared.drain()
    assert shared.model.batches == [], "a refused payload reached the model"
    assert shared.daemon.engine.streams == {}, "a refused payload created a stream"
    # Refusing costs little, even for 16 MB (the size cap comes before decoding): 2-core box,
    # about 1 ms measured, bound 250 ms.
    assert elapsed_s < 0.25, f"{elapsed_s:.3f} s to refuse one payload"


def test_table_covers_every_drop_reason() -> None:
    from daemon.reading import DROP_REASONS

    assert {r for _, r, _, _ in HOSTILE} >= set(DROP_REASONS)


def test_unusual_but_valid_stream_ids_are_streams(intake: Intake) -> None:
    """Unicode, spaces, 128 characters: valid topic levels, so valid stream ids."""
    ids = ["ストリーム", "pump 7", "x" * 128, "é" * 128, "a.b-c_d", "status", "ops"]
    for stream in ids:
        assert intake.offer(f"sensors/{stream}/data", intake.reading(T0, 0))
    intake.drain()
    assert sorted(intake.daemon.engine.streams) == sorted(ids)
    assert intake.results()["ok"] == len(ids)


def test_duplicate_json_keys_last_value_wins(intake: Intake) -> None:
    """Documented behaviour: a repeated key is not an error; its last value is used."""
    parser = intake.daemon.intake.layout.parser
    ts_twice = reading_text(ts="1", extra=', "ts": 1767225600')
    [parsed] = parser.parse(ts_twice)
    assert parsed.ts == T0
    names = intake.channels
    doc = ", ".join(f'"{n}": 1' for n in names)
    # The first value of the first channel would be refused (a string); the last one is used.
    twice = f'{{"ts": 1767225600, "values": {{"{names[0]}": "x", {doc}}}}}'.encode()
    [parsed] = parser.parse(twice)
    assert parsed.values.tolist() == [1.0] * len(names)
    # ... and the other way round: a good first value does not save a bad last one.
    bad_last = f'{{"ts": 1767225600, "values": {{{doc}, "{names[0]}": NaN}}}}'.encode()
    with pytest.raises(PayloadError) as caught:
        parser.parse(bad_last)
    assert caught.value.reason == "non_finite"


# -- timestamps that only the stream can judge ---------------------------------------------------


def test_duplicate_and_out_of_order_readings_are_counted_and_never_scored(intake: Intake) -> None:
    window = intake.manifest.window
    n = window + 10
    intake.feed("t", n)  # readings 0 .. n-1, one window per reading after the first window
    scored = intake.model.windows()
    assert scored == n - window + 1
    assert intake.value("oteo_readings_total") == n

    hostile = [
        ("duplicate", intake.reading(T0 + n - 1, n - 1, intake.row(n - 1))),  # the last again
        ("duplicate", intake.reading(T0 + n - 5, n - 5, intake.row(n - 5))),  # an older one again
        ("duplicate", intake.reading(T0 + n - 1 + 0.3, None, intake.row(n))),  # jitter, same slot
        ("late", intake.reading(T0 - 100, None, intake.row(5))),  # beyond the ring, no seq
        ("duplicate", intake.reading(T0 - 100, 3, intake.row(5))),  # beyond the ring, old seq
        ("late", intake.reading(1.0, None, intake.row(0))),  # 1970
    ]
    for reason, payload in hostile:
        before = intake.results()
        assert intake.offer("sensors/t/data", payload)
        intake.drain()
        after = intake.results()
        changed = {r: after[r] - before[r] for r in after if after[r] != before[r]}
        # Parsed fine ("ok"), then dropped by the stream buffer under its reason.
        assert changed == {"ok": 1.0, reason: 1.0}, (reason, changed)
    assert intake.value("oteo_readings_total") == n
    assert intake.model.windows() == scored, "a duplicate or late reading reached the model"

    # A reading skipped then sent late: the gap was filled, the straggler is late.
    intake.offer("sensors/t/data", intake.reading(T0 + n + 1, n + 1, intake.row(n + 1)))
    intake.offer("sensors/t/data", intake.reading(T0 + n, n, intake.row(n)))
    intake.drain()
    assert intake.value("oteo_filled_samples_total") == 1
    assert intake.value("oteo_seq_gaps_total") == 1
    assert intake.results()["late"] == 3
    print(
        f"\nhostile timestamps: {len(hostile) + 1} refused by the stream buffer "
        f"(duplicate {intake.results()['duplicate']:.0f}, late {intake.results()['late']:.0f}), "
        f"windows scored {intake.model.windows()} (all from valid readings)"
    )


def test_a_far_future_timestamp_does_not_blind_the_stream(intake: Intake) -> None:
    """One reading from a device whose clock jumped years ahead, then its clock is right again.

    It must be dropped (counted), and the correct readings after it must still be scored.
    """
    window = intake.manifest.window
    intake.feed("clock", window)
    assert intake.model.windows() == 1
    ten_years = 10 * 365 * 86400.0
    assert T0 + ten_years < UNIX_TS_MAX  # within what the parser accepts
    intake.offer("sensors/clock/data", intake.reading(T0 + window + ten_years, window))
    intake.drain()
    more = 2 * window
    intake.feed("clock", more, start=window + 1)
    readings = intake.value("oteo_readings_total")
    results = intake.results()
    report = (
        f"after one reading 10 years ahead: readings taken {readings:.0f} of {window + more} "
        f"valid, windows scored {intake.model.windows()}, late {results['late']:.0f}, "
        f"bad_timestamp {results['bad_timestamp']:.0f}"
    )
    print("\n" + report)
    assert results["bad_timestamp"] == 1, report
    # The refused reading's slot is a one-sample gap: interpolated, and its window scored too.
    assert intake.model.windows() == 1 + 1 + more, report


# -- values the model cannot take ----------------------------------------------------------------


def test_a_value_beyond_float32_range_never_reaches_the_model(intake: Intake) -> None:
    """1e39 is a finite double but +inf as the float32 the model takes."""
    window = intake.manifest.window
    intake.feed("f32", window)
    values = intake.row(window)
    values[0] = 1e39
    intake.offer("sensors/f32/data", intake.reading(T0 + window, window, values))
    intake.drain()
    intake.feed("f32", 3, start=window + 1)
    bad = [i for i, b in enumerate(intake.model.batches) if not np.isfinite(b).all()]
    assert bad == [], f"non-finite windows reached the model in batches {bad}"


def test_a_huge_value_does_not_crash_the_main_loop_when_scores_are_published(
    tmp_path: Path,
) -> None:
    """publish_scores on: the window holding 1e39 scores NaN; its message must not crash."""
    daemon = make_daemon(tmp_path, **{"topics.publish_scores": True})
    try:
        intake = Intake(daemon)
        window = intake.manifest.window
        intake.feed("p", window)
        values = intake.row(window)
        values[0] = 1e39
        intake.offer("sensors/p/data", intake.reading(T0 + window, window, values))
        intake.drain()  # raised pydantic ValidationError (WindowScore.p_value = NaN) here
        intake.feed("p", window, start=window + 1)
        assert intake.model.windows() >= window
    finally:
        daemon.responder.close()
        daemon.outbox.close()


def test_one_absurd_value_does_not_blind_the_stream_for_good(intake: Intake) -> None:
    """1e25 fits float32 but overflows the model's squared error: that window's score is not
    finite. Once the value has left the window, scores must be finite again."""
    window = intake.manifest.window
    intake.feed("absurd", window)
    values = intake.row(window)
    values[0] = 1e25
    intake.offer("sensors/absurd/data", intake.reading(T0 + window, window, values))
    intake.drain()
    intake.feed("absurd", 2 * window, start=window + 1)
    stream = intake.daemon.engine.streams["absurd"]
    last_batch = intake.model.batches[-1]
    assert np.isfinite(last_batch[-1]).all()  # the last window no longer holds the value
    assert stream.last_score is not None and math.isfinite(stream.last_score), (
        f"stream score stuck at {stream.last_score} after one absurd value"
    )


def test_a_huge_seq_jump_neither_crashes_nor_poisons_the_gap_count(intake: Intake) -> None:
    intake.feed("seq", 3)
    huge = intake.reading(T0 + 3, 10**400, intake.row(3))
    assert intake.offer("sensors/seq/data", huge)
    intake.drain()  # raised OverflowError (prometheus Counter.inc(10**400)) here
    gaps_before = intake.value("oteo_seq_gaps_total")
    # The sender restarts its counter, then really loses one reading: that gap must show.
    intake.offer("sensors/seq/data", intake.reading(T0 + 4, 0, intake.row(4)))
    intake.offer("sensors/seq/data", intake.reading(T0 + 5, 2, intake.row(5)))
    intake.drain()
    assert intake.value("oteo_seq_gaps_total") - gaps_before == 1


def test_a_large_seq_jump_does_not_make_later_gaps_invisible(intake: Intake) -> None:
    intake.feed("seq2", 3)
    intake.offer("sensors/seq2/data", intake.reading(T0 + 3, 10**300, intake.row(3)))
    intake.drain()
    gaps_before = intake.value("oteo_seq_gaps_total")
    intake.offer("sensors/seq2/data", intake.reading(T0 + 4, 0, intake.row(4)))
    intake.offer("sensors/seq2/data", intake.reading(T0 + 5, 2, intake.row(5)))
    intake.drain()
    assert intake.value("oteo_seq_gaps_total") - gaps_before == 1, (
        f"oteo_seq_gaps_total is {gaps_before:.3g} after one jump: a real gap of 1 is lost in "
        "float rounding"
    )


def test_a_seq_gap_across_a_silence_is_still_counted(tmp_path: Path) -> None:
    """A stream falls silent longer than stale_after_s (a broker outage, a device's network
    down), then comes back with readings missing: the gap must still show in
    oteo_seq_gaps_total, or a loss during an outage is invisible exactly when it is likely."""
    daemon = make_daemon(tmp_path, **{"ingest.stale_after_s": 0.05})
    try:
        intake = Intake(daemon)
        intake.feed("quiet", 3)  # seq 0, 1, 2
        time.sleep(0.1)  # silent for longer than stale_after_s: the scenario needs time to pass
        daemon.engine.tick()  # the stream is stale now
        assert daemon.engine.streams["quiet"].state == "stale"
        intake.offer("sensors/quiet/data", intake.reading(T0 + 10, 10, intake.row(10)))
        intake.drain()
        assert intake.value("oteo_seq_gaps_total") == 7, "readings 3-9 lost without a trace"
    finally:
        daemon.responder.close()
        daemon.outbox.close()


def test_qos0_beyond_the_queue_is_dropped_and_counted_qos1_is_left_at_the_broker(
    tmp_path: Path,
) -> None:
    daemon = make_daemon(tmp_path, **{"ingest.queue_size": 4})
    try:
        intake = Intake(daemon)
        for i in range(4):
            assert intake.offer("sensors/q/data", intake.reading(T0 + i, i))
        assert intake.offer("sensors/q/data", intake.reading(T0 + 4, 4), qos=0) is True
        assert intake.offer("sensors/q/data", intake.reading(T0 + 4, 4), qos=1) is False
        assert daemon.intake.queue.qsize() == 4
        assert intake.results()["queue_full_qos0"] == 1
        assert intake.results()["ok"] == 4
    finally:
        daemon.responder.close()
        daemon.outbox.close()


def test_the_ingest_queue_bound_counts_readings_not_messages(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, **{"ingest.queue_size": 10})
    try:
        intake = Intake(daemon)

        def batch(first: int, n: int) -> bytes:
            rows = range(first, first + n)
            docs = [{"ts": T0 + i, "seq": i, "values": intake.mean} for i in rows]
            return json.dumps(docs).encode()

        assert intake.offer("sensors/q/data", batch(0, 8))
        assert not intake.offer("sensors/q/data", batch(8, 3)), "11 readings queued, bound 10"
        assert intake.offer("sensors/q/data", intake.reading(T0 + 8, 8))  # 9 readings: fits
        intake.drain()
        assert intake.value("oteo_readings_total") == 9
        # An empty queue takes a batch larger than the bound: it would never fit otherwise.
        small = make_daemon(tmp_path / "small", **{"ingest.queue_size": 4})
        try:
            assert Intake(small).offer("sensors/q/data", batch(0, 8))
        finally:
            small.responder.close()
            small.outbox.close()
    finally:
        daemon.responder.close()
        daemon.outbox.close()


# -- property test of the parser -----------------------------------------------------------------

CHANNELS = ["a", "b", "c"]
PROPERTY_PARSER = ReadingParser(CHANNELS, max_payload_bytes=MAX_PAYLOAD, max_batch=MAX_BATCH)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, -0.0, 1e-320, 1e308, -1e308, 1e39, 3.4e38, 2**63, 2**64])
)
timestamps = (
    st.floats(min_value=-1e12, max_value=1e12)
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.sampled_from(
        ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+02:00", "2026-13-01T00:00:00Z",
         "1970-01-01T00:00:00Z", "now", "", "2026-01-01 00:00:00z"]
    )
    | json_scalars
)  # fmt: skip
value_lists = st.lists(numbers | json_scalars, min_size=0, max_size=5)
value_dicts = st.dictionaries(
    st.sampled_from([*CHANNELS, "d", "A", ""]), numbers | json_scalars, max_size=5
)
readings = st.fixed_dictionaries(
    {"ts": timestamps, "values": value_lists | value_dicts | json_values},
    optional={
        "seq": st.none() | st.integers(min_value=-5, max_value=10**400) | json_scalars,
        "extra": json_scalars,
    },
)
payload_docs = readings | st.lists(readings, min_size=0, max_size=MAX_BATCH + 2) | json_values


def check_accepted(parsed: list[ParsedReading], doc: Any) -> None:
    assert isinstance(parsed, list) and parsed
    items = doc if isinstance(doc, list) else [doc]
    assert len(parsed) == len(items) <= MAX_BATCH
    for reading, item in zip(parsed, items, strict=True):
        assert isinstance(reading, ParsedReading)
        assert isinstance(reading.ts, float) and 0 <= reading.ts < UNIX_TS_MAX
        assert reading.seq is None or (type(reading.seq) is int and reading.seq >= 0)
        assert reading.seq == item.get("seq")
        assert reading.values.shape == (len(CHANNELS),)
        assert reading.values.dtype == np.float64
        assert np.isfinite(reading.values).all()
        sent = item["values"]
        ordered = sent if isinstance(sent, list) else [sent[name] for name in CHANNELS]
        assert reading.values.tolist() == [float(v) for v in ordered]


@settings(max_examples=250, deadline=None, database=None, print_blob=True)
@given(doc=payload_docs)
def test_parser_property_on_json_documents(doc: Any) -> None:
    payload = json.dumps(doc, allow_nan=True).encode()
    try:
        parsed = PROPERTY_PARSER.parse(payload)
    except PayloadError:
        return
    check_accepted(parsed, doc)


@settings(max_examples=200, deadline=None, database=None, print_blob=True)
@given(data=st.binary(max_size=300) | st.builds(lambda d: json.dumps(d).encode(), readings))
def test_parser_property_on_bytes(data: bytes) -> None:
    """Raw bytes (and mangled readings): PayloadError or a well-formed result, nothing else."""
    for payload in (data, data[: len(data) // 2], data[::-1]):
        try:
            parsed = PROPERTY_PARSER.parse(payload)
        except PayloadError:
            pass
        else:
            check_accepted(parsed, json.loads(payload))
        try:
            sample = PROPERTY_PARSER.parse_channel_sample(payload)
        except PayloadError:
            pass
        else:
            assert math.isfinite(sample.value)
            assert sample.ts is None or 0 <= sample.ts < UNIX_TS_MAX


# -- state machine over StreamBuffer -------------------------------------------------------------

SM_T0 = 1000.0  # data time; a window's channel 0 holds each sample's own time offset
SM_CHANNELS = 2


class StreamBufferMachine(RuleBasedStateMachine):
    """Readings in every order a network and a broker can produce; windows stay sane.

    Channel 0 of each reading carries its own time offset, so a window is in time order exactly
    when its channel 0 increases. A reading lands in the slot nearest its time on a grid anchored
    at a (jittered) reading, so consecutive samples of a window, received or interpolated, are
    more than 0 and less than 2 periods apart.
    """

    @initialize(
        window=st.integers(1, 6),
        hop=st.integers(1, 3),
        max_gap_s=st.sampled_from([1.0, 2.0, 4.0]),
        tolerance_s=st.sampled_from([0.0, 0.0, 2.0, 3.5]),
    )
    def setup(self, window: int, hop: int, max_gap_s: float, tolerance_s: float) -> None:
        self.buf = StreamBuffer(
            window,
            SM_CHANNELS,
            hop=hop,
            period_s=1.0,
            max_gap_s=max_gap_s,
            reorder_tolerance_s=tolerance_s,
        )
        self.window = window
        self.clock = 0  # grid index of the newest reading sent in order
        self.seq = 0
        self.sent: list[tuple[float, int | None]] = []
        self.newest_ts = -math.inf
        self.windows = 0

    def _push(self, ts: float, seq: int | None, value: float | None = None) -> None:
        values = np.array([ts - SM_T0, ts if value is None else value], dtype=np.float64)
        out = self.buf.push(ts, values, seq)
        self.sent.append((ts, seq))
        self.newest_ts = max(self.newest_ts, ts)
        if out.result in (PushResult.DUPLICATE, PushResult.LATE):
            assert out.windows_ready == 0 and out.seq_gap == 0 and out.filled == 0
        self._check(out)

    def _check(self, out: PushOutcome) -> None:
        assert out.windows_ready >= 0 and out.seq_gap >= 0 and out.filled >= 0
        previous_end = math.inf
        for i in range(out.windows_ready):
            w = self.buf.take_at(i)
            assert w.shape == (self.window, SM_CHANNELS) and w.dtype == np.float32
            assert np.isfinite(w).all()
            times = w[:, 0].astype(np.float64)
            steps = np.diff(times)
            assert ((steps > 0) & (steps < 2)).all(), times.tolist()
            assert times[-1] <= self.newest_ts - SM_T0 + 1e-3  # nothing from the future
            assert times[-1] < previous_end  # take_at(i): newest first
            previous_end = times[-1]
            self.windows += 1

    @rule(jitter=st.floats(-0.4, 0.4), with_seq=st.booleans())
    def append(self, jitter: float, with_seq: bool) -> None:
        self.clock += 1
        self.seq += 1
        self._push(SM_T0 + self.clock + jitter, self.seq if with_seq else None)

    @rule(periods=st.integers(2, 8), jitter=st.floats(-0.4, 0.4), lost=st.integers(0, 10**6))
    def gap(self, periods: int, jitter: float, lost: int) -> None:
        self.clock += periods
        self.seq += 1 + lost
        self._push(SM_T0 + self.clock + jitter, self.seq)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        ts, seq = data.draw(st.sampled_from(self.sent))
        self._push(ts, seq)

    @precondition(lambda self: self.clock > 0)
    @rule(back=st.integers(1, 12), jitter=st.floats(-0.4, 0.4), with_seq=st.booleans())
    def reorder(self, back: int, jitter: float, with_seq: bool) -> None:
        self.seq += 1
        self._push(SM_T0 + self.clock - back + jitter, self.seq if with_seq else None)

    @rule(value=st.sampled_from([0.0, -1e30, 1e30, 3.4e38, -3.4e38, 1e-45]))
    def extreme_value(self, value: float) -> None:
        self.clock += 1
        self.seq += 1
        self._push(SM_T0 + self.clock, self.seq, value)

    @rule(everything=st.booleans())
    def drain(self, everything: bool) -> None:
        now = None if everything else SM_T0 + self.clock
        outcomes = self.buf.drain(now)
        for out in outcomes:
            assert out.result in (PushResult.ACCEPTED, PushResult.GAP_RESET)
        # drain() outcomes share one take_at index: check them together.
        ready = sum(out.windows_ready for out in outcomes)
        self._check(PushOutcome(PushResult.ACCEPTED, ready, 0, 0))

    @rule()
    def restart(self) -> None:
        self.buf.reset()
        self.newest_ts = -math.inf

    @invariant()
    def last_ts_on_the_grid(self) -> None:
        last = self.buf.last_ts
        assert last is None or math.isfinite(last)


StreamBufferMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_stream_buffer_state_machine = StreamBufferMachine.TestCase
