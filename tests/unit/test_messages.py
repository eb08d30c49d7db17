"""The message contract: strict reading intake, output wire format, hash bit order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from daemon.messages import Event, ModelRef, Status, StreamState, format_ts
from daemon.reading import DROP_REASONS, ChannelPayload, PayloadError, ReadingParser, ReadingPayload
from daemon.request import ErrorReply, HashReply, OpRequest, bits_to_hex, hex_to_bits

CHANNELS = ["temp", "pressure", "flow"]
MAX_BYTES = 4096
MAX_BATCH = 4
TS = 1_700_000_000.25


def parser() -> ReadingParser:
    return ReadingParser(CHANNELS, max_payload_bytes=MAX_BYTES, max_batch=MAX_BATCH)


def reading(**fields: object) -> dict[str, object]:
    return {"ts": TS, "values": {"temp": 20.5, "pressure": 1.0, "flow": 3}, **fields}


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


# Every drop reason with a concrete payload.
REFUSED: dict[str, list[bytes]] = {
    "too_large": [encode(reading()) + b" " * MAX_BYTES],  # valid JSON, only too large
    "not_json": [b"{ts: 1}", b"", b"\xff\xfe", b"[" * 1000],  # the last: nested too deep
    "bad_schema": [
        b"42",
        b'"text"',
        encode({"values": [1, 2, 3]}),
        encode({"ts": TS}),
        encode(reading(device="x")),
        encode(reading(values="1,2,3")),
        encode([reading(), 7]),
    ],
    "non_finite": [
        b'{"ts": 1700000000, "values": [NaN, 1, 2]}',
        b'{"ts": 1700000000, "values": {"temp": Infinity, "pressure": 1, "flow": 2}}',
        b'{"ts": 1700000000, "values": [-Infinity, 1, 2]}',
        b'{"ts": 1700000000, "values": [1e400, 1, 2]}',
        b'{"ts": 1700000000, "values": [1, 2, ' + b"9" * 400 + b"]}",
    ],
    "bad_type": [
        encode(reading(values=["1.5", 1, 2])),
        encode(reading(values={"temp": "1.5", "pressure": 1, "flow": 2})),
        encode(reading(values=[True, 1, 2])),
        encode(reading(values=[None, 1, 2])),
        encode(reading(values=[[1], 1, 2])),
        encode(reading(seq=1.0)),
        encode(reading(seq=True)),
        encode(reading(seq=-1)),
    ],
    "bad_timestamp": [
        encode(reading(ts="yesterday")),
        encode(reading(ts="2024-01-01T00:00:00")),  # no offset: ambiguous
        encode(reading(ts="2024-02-30T00:00:00Z")),
        encode(reading(ts=True)),
        encode(reading(ts=None)),
        encode(reading(ts=-1)),
        encode(reading(ts=1_700_000_000_000)),  # milliseconds
        b'{"ts": NaN, "values": [1, 2, 3]}',
    ],
    "unknown_channel": [encode(reading(values={"temp": 1, "pressure": 1, "flow": 1, "rpm": 1}))],
    "missing_channel": [encode(reading(values={"temp": 1, "pressure": 1}))],
    "wrong_length": [encode(reading(values=[1, 2])), encode(reading(values=[1, 2, 3, 4]))],
    "empty_batch": [b"[]"],
    "batch_too_large": [encode([reading()] * (MAX_BATCH + 1))],
}

ACCEPTED: list[bytes] = [
    encode(reading()),
    encode(reading(values=[20.5, 1.0, 3])),
    encode(reading(seq=0)),
    encode(reading(seq=None)),
    encode(reading(ts="2023-11-14T22:13:20.25Z")),
    encode(reading(ts="2023-11-14T23:13:20.25+01:00")),
    encode(reading(ts=1_700_000_000)),
    encode([reading(seq=1), reading(seq=2, values=[1, 2, 3])]),
    encode([reading()] * MAX_BATCH),
]


def test_every_drop_reason_has_a_case() -> None:
    assert set(REFUSED) == set(DROP_REASONS)


REFUSED_CASES = [
    pytest.param(reason, payload, id=f"{reason}-{i}")
    for reason, payloads in REFUSED.items()
    for i, payload in enumerate(payloads)
]


@pytest.mark.parametrize(("reason", "payload"), REFUSED_CASES)
def test_malformed_payload_is_refused_with_its_reason(reason: str, payload: bytes) -> None:
    with pytest.raises(PayloadError) as caught:
        parser().parse(payload)
    assert caught.value.reason == reason


def test_named_values_come_out_in_channel_order() -> None:
    payload = encode(reading(values={"flow": 3, "temp": 20.5, "pressure": 1.0}, seq=7))
    [parsed] = parser().parse(payload)
    assert parsed.ts == TS
    assert parsed.seq == 7
    assert parsed.values.dtype == np.float64
    assert parsed.values.tolist() == [20.5, 1.0, 3.0]


def test_ordered_values_are_taken_as_given() -> None:
    [parsed] = parser().parse(encode(reading(values=[4, 5.5, -6])))
    assert parsed.values.tolist() == [4.0, 5.5, -6.0]
    assert parsed.seq is None


def test_batch_keeps_order_and_fields() -> None:
    payload = encode([reading(ts=TS + i, seq=i, values=[i, i + 1, i + 2]) for i in range(3)])
    parsed = parser().parse(payload)
    assert [p.ts for p in parsed] == [TS, TS + 1, TS + 2]
    assert [p.seq for p in parsed] == [0, 1, 2]
    assert np.stack([p.values for p in parsed]).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert not parsed[0].values.flags.writeable


def test_rfc3339_and_unix_timestamps_agree() -> None:
    unix = parser().parse(encode(reading(ts=TS)))[0].ts
    utc = parser().parse(encode(reading(ts="2023-11-14T22:13:20.25Z")))[0].ts
    offset = parser().parse(encode(reading(ts="2023-11-14T23:13:20.25+01:00")))[0].ts
    assert unix == utc == offset


def test_one_bad_reading_drops_the_whole_batch() -> None:
    with pytest.raises(PayloadError) as caught:
        parser().parse(encode([reading(), reading(values=[1, "2", 3])]))
    assert caught.value.reason == "bad_type"


def test_size_cap_is_checked_before_decoding() -> None:
    huge = b"[" * (MAX_BYTES + 1)  # would be not_json if it were decoded
    with pytest.raises(PayloadError) as caught:
        parser().parse(huge)
    assert caught.value.reason == "too_large"


def validates(payload: bytes) -> bool:
    """The documented contract: the pydantic models, with the parser's limits as context."""
    if len(payload) > MAX_BYTES:
        return False
    context = {"channels": CHANNELS, "max_batch": MAX_BATCH}
    try:
        ReadingPayload.model_validate_json(payload, context=context)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    ("expected", "payload"),
    [pytest.param(None, p, id=f"accepted-{i}") for i, p in enumerate(ACCEPTED)] + REFUSED_CASES,
)
def test_fast_parser_agrees_with_the_pydantic_contract(
    expected: str | None, payload: bytes
) -> None:
    try:
        parser().parse(payload)
        accepted = True
    except PayloadError:
        accepted = False
    assert accepted == (expected is None) == validates(payload)


@pytest.mark.parametrize("payload", ACCEPTED, ids=range(len(ACCEPTED)))
def test_accepted_payloads_are_accepted(payload: bytes) -> None:
    assert parser().parse(payload)


CHANNEL_CASES: list[tuple[bytes, float | None, float | str]] = [
    (b"21.5", None, 21.5),
    (b"-3", None, -3.0),
    (b'{"ts": 1700000000.25, "value": 2}', TS, 2.0),
    (b'{"ts": "2023-11-14T22:13:20.25Z", "value": 2.5}', TS, 2.5),
    (b'{"value": 2.5}', None, 2.5),
    (b"NaN", None, "non_finite"),
    (b"Infinity", None, "non_finite"),
    (b'"21.5"', None, "bad_type"),
    (b"true", None, "bad_type"),
    (b"null", None, "bad_type"),
    (b'{"ts": 1, "value": "2"}', None, "bad_type"),
    (b"[1]", None, "bad_schema"),
    (b'{"v": 1}', None, "bad_schema"),
    (b'{"ts": "now", "value": 1}', None, "bad_timestamp"),
    (b"21.5 kg", None, "not_json"),
    (b" " * (MAX_BYTES + 1), None, "too_large"),
]


@pytest.mark.parametrize(
    ("payload", "ts", "expected"), CHANNEL_CASES, ids=range(len(CHANNEL_CASES))
)
def test_channel_payload_is_a_strict_number(
    payload: bytes, ts: float | None, expected: float | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(PayloadError) as caught:
            parser().parse_channel_sample(payload)
        assert caught.value.reason == expected
        assert len(payload) > MAX_BYTES or not _channel_validates(payload)
    else:
        assert parser().parse_channel_sample(payload) == (ts, expected)
        assert parser().parse_channel_value(payload) == expected
        assert _channel_validates(payload)


def _channel_validates(payload: bytes) -> bool:
    try:
        ChannelPayload.model_validate_json(payload)
    except ValidationError:
        return False
    return True


def test_hash_hex_puts_the_first_bit_first() -> None:
    assert bits_to_hex(np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)) == "81"
    assert bits_to_hex(np.array([1, 0, 1], dtype=bool)) == "5"  # zero-padded on the left
    assert bits_to_hex(np.array([0] * 9, dtype=bool)) == "000"
    assert bits_to_hex(np.array([1] + [0] * 15, dtype=bool)) == "8000"


@pytest.mark.parametrize("nbits", [1, 3, 4, 7, 8, 16, 33, 64, 129])
def test_hash_hex_round_trips(nbits: int) -> None:
    bits = np.random.default_rng(nbits).random(nbits) > 0.5
    text = bits_to_hex(bits)
    assert len(text) == -(-nbits // 4)
    assert hex_to_bits(text, nbits).tolist() == bits.tolist()


def test_hex_wider_than_its_bit_count_is_refused() -> None:
    with pytest.raises(ValueError):
        hex_to_bits("8", 3)
    with pytest.raises(ValueError):
        HashReply(bits=["5", "12"], nbits=3)


MODEL = ModelRef(name="pump", version="1", sha256="ab" * 32)


def test_outputs_carry_schema_version_and_utc_timestamps() -> None:
    status = Status(instance="edge-1", state="online", ts=format_ts(TS), version="0.1.0")
    wire = json.loads(status.to_json())
    assert wire["schema"] == 1
    assert "schema_version" not in wire
    assert wire["ts"] == "2023-11-14T22:13:20.250000Z"
    assert Status.model_validate(wire) == status


def test_output_refuses_a_timestamp_with_an_offset() -> None:
    with pytest.raises(ValidationError):
        StreamState(stream="s", state="normal", ts="2023-11-14T23:13:20+01:00")


def test_event_round_trips_through_its_wire_form() -> None:
    event = Event(
        event_id="e1",
        kind="start",
        stream="pump-1",
        instance="edge-1",
        ts=format_ts(TS),
        started=format_ts(TS),
        score=3.0,
        peak_score=3.0,
        threshold=2.0,
        p_value=0.001,
        top_channels=[
            {
                "channel": "temp",
                "contribution": 0.8,
                "score": 4.0,
                "observed": 90.0,
                "expected": 60.0,
                "direction": "high",
            }
        ],
        model=MODEL,
    )
    wire = json.loads(event.to_json())
    assert wire["ended"] is None
    assert Event.model_validate(wire) == event


def test_op_request_must_be_rectangular_and_finite() -> None:
    good = OpRequest.model_validate_json(b'{"windows": [[[1, 2], [3, 4]]], "id": "x"}')
    assert good.array().shape == (1, 2, 2)
    for bad in [
        b'{"windows": [[[1, 2], [3]]]}',
        b'{"windows": [[[1, 2]], [[1, 2], [3, 4]]]}',
        b'{"windows": [[[1, NaN]]]}',
        b'{"windows": [[["1", 2]]]}',
        b'{"windows": []}',
        b'{"windows": [[[1]]], "reply_to": "a/#"}',
    ]:
        with pytest.raises(ValidationError):
            OpRequest.model_validate_json(bad)


def test_error_reply_for_an_unknown_op_has_no_op() -> None:
    reply = ErrorReply(error="bad_request", message="unknown op 'frobnicate'", id="7")
    wire = json.loads(reply.to_json())
    assert wire == {
        "schema": 1,
        "id": "7",
        "op": None,
        "error": "bad_request",
        "message": "unknown op 'frobnicate'",
    }
