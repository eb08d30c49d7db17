"""Operation requests against a real exported model: replies, every refusal, the busy cap."""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from daemon.model import Model
from daemon.ops import CONTROL_OPS, STATELESS_OPS, OpsHandler, ReplyTarget, mqtt_reply_target
from daemon.request import (
    ControlReply,
    DenoiseReply,
    EncodeReply,
    ErrorReply,
    HashReply,
    ScoreReply,
    bits_to_hex,
    hex_to_bits,
)


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Model:
    return Model.load(tiny_model_path)


@pytest.fixture(scope="module")
def hash_model(tiny_hash_model_path: Path) -> Model:
    return Model.load(tiny_hash_model_path)


@pytest.fixture
def windows(tiny_windows: np.ndarray) -> np.ndarray:
    """Five raw-unit windows of normal data, a few samples apart."""
    return tiny_windows[:50:10].copy()


def body(windows: np.ndarray | list[Any], **extra: Any) -> bytes:
    data = windows.tolist() if isinstance(windows, np.ndarray) else windows
    return json.dumps({"windows": data, **extra}).encode()


def error_of(reply: bytes) -> ErrorReply:
    return ErrorReply.model_validate_json(reply)


# -- replies --------------------------------------------------------------------------------


def test_denoise_returns_reconstruction_in_raw_units(model: Model, windows: np.ndarray) -> None:
    status, reply = OpsHandler(lambda: model).handle("denoise", body(windows, id="d1"))
    assert status == 200
    parsed = DenoiseReply.model_validate_json(reply)
    recon = np.asarray(parsed.reconstruction)
    assert parsed.id == "d1"
    assert recon.shape == windows.shape
    np.testing.assert_array_equal(recon, model.run(windows).reconstruction)
    # Raw units: each channel sits near its training mean, not near 0 as standardised data would.
    mean = np.asarray(model.manifest.channel_mean)
    scale = np.asarray(model.manifest.channel_scale)
    assert np.all(np.abs(recon.mean(axis=(0, 1)) - mean) < 5 * scale)


def test_encode_returns_one_code_per_window(model: Model, windows: np.ndarray) -> None:
    status, reply = OpsHandler(lambda: model).handle("encode", body(windows, id="e"))
    assert status == 200
    parsed = EncodeReply.model_validate_json(reply)
    assert np.asarray(parsed.code).shape == (len(windows), model.manifest.code_size)
    assert parsed.id == "e"


def test_hash_bits_agree_with_code_above_half(hash_model: Model, windows: np.ndarray) -> None:
    status, reply = OpsHandler(lambda: hash_model).handle("hash", body(windows, id="h"))
    assert status == 200
    parsed = HashReply.model_validate_json(reply)
    nbits = hash_model.manifest.code_size
    assert parsed.nbits == nbits
    assert parsed.id == "h"
    assert [len(h) for h in parsed.bits] == [-(-nbits // 4)] * len(windows)
    code = hash_model.run(windows).code
    for hexed, row in zip(parsed.bits, code, strict=True):
        np.testing.assert_array_equal(hex_to_bits(hexed, nbits), row > 0.5)


def test_score_equals_model_run_with_p_values(model: Model, windows: np.ndarray) -> None:
    windows[-1] += 20 * np.asarray(model.manifest.channel_scale, dtype=np.float32)  # abnormal
    status, reply = OpsHandler(lambda: model).handle("score", body(windows, id="s"))
    assert status == 200
    parsed = ScoreReply.model_validate_json(reply)
    out = model.run(windows)
    np.testing.assert_array_equal(np.asarray(parsed.score), out.score)
    np.testing.assert_array_equal(np.asarray(parsed.channel_score), out.channel_score)
    assert all(0.0 <= p <= 1.0 for p in parsed.p_value)
    assert parsed.p_value[-1] < max(parsed.p_value[:-1])
    assert parsed.threshold == model.manifest.alarm.enter_threshold
    assert parsed.id == "s"


def test_each_request_uses_the_model_current_when_it_starts(
    model: Model, hash_model: Model, windows: np.ndarray
) -> None:
    current = {"model": model}
    handler = OpsHandler(lambda: current["model"])
    before = json.loads(handler.handle("encode", body(windows))[1])["code"]
    current["model"] = hash_model  # a hot reload
    after = json.loads(handler.handle("encode", body(windows))[1])["code"]
    np.testing.assert_allclose(before, model.run(windows).code, rtol=1e-6)
    np.testing.assert_allclose(after, hash_model.run(windows).code, rtol=1e-6)


def test_observe_gets_op_result_and_duration(model: Model, windows: np.ndarray) -> None:
    seen: list[tuple[str, str, float]] = []
    handler = OpsHandler(lambda: model, observe=lambda *args: seen.append(args))
    handler.handle("score", body(windows))
    handler.handle("score", b"{}")
    handler.handle("../etc/passwd", b"{}")
    assert [(op, result) for op, result, _ in seen] == [
        ("score", "ok"),
        ("score", "bad_request"),
        ("unknown", "unknown_op"),  # a bounded metric label, whatever the name asked for
    ]
    assert all(seconds >= 0 for _, _, seconds in seen)


# -- refusals -------------------------------------------------------------------------------

Make = Callable[[Model, np.ndarray], bytes]
REFUSALS: dict[str, tuple[Make, int, str, str]] = {
    "invalid_json": (lambda m, x: b'{"windows": [[[1, 2]', 400, "bad_request", "Invalid JSON"),
    "not_an_object": (lambda m, x: b"[1, 2]", 400, "bad_request", "object"),
    "unknown_field": (lambda m, x: body(x, x=1), 400, "bad_request", "x: Extra inputs"),
    "string_value": (lambda m, x: body([[["1"]]]), 400, "bad_request", "windows.0.0.0: "),
    "ragged": (lambda m, x: body([[[1.0, 2.0], [1.0]]]), 400, "bad_request", "same [window]"),
    "wrong_window": (
        lambda m, x: body(x[:1, 2:]),
        400,
        "bad_request",
        "windows must have shape [batch, 16, 8], got [1, 14, 8]",
    ),
    "wrong_channels": (lambda m, x: body(x[:2, :, :3]), 400, "bad_request", "got [2, 16, 3]"),
    "nan": (
        lambda m, x: body(x).replace(b"[[[", b"[[[NaN, ", 1),
        400,
        "bad_request",
        "finite number",
    ),
    "float32_overflow": (
        lambda m, x: body(x.astype(float) * 1e38),
        400,
        "bad_request",
        "float32 range",
    ),
    "too_many_windows": (
        lambda m, x: body(np.concatenate([x, x])),
        400,
        "bad_request",
        "10 windows exceed the limit of 8",
    ),
    "too_large": (lambda m, x: b" " * 70_000 + body(x), 413, "too_large", "exceeds 64000"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_request_is_refused_with_status_and_one_line(
    model: Model, windows: np.ndarray, case: str
) -> None:
    make, want_status, want_error, fragment = REFUSALS[case]
    handler = OpsHandler(lambda: model, max_windows=8, max_request_bytes=64_000)
    status, reply = handler.handle("score", make(model, windows))
    error = error_of(reply)
    assert (status, error.error, error.op) == (want_status, want_error, "score")
    assert fragment in error.message
    assert "\n" not in error.message


def test_refusal_echoes_the_request_id_when_readable(model: Model) -> None:
    reply = OpsHandler(lambda: model).handle("score", body([[[1.0]]], id="abc"))[1]
    assert error_of(reply).id == "abc"


def test_unknown_op_is_404(model: Model, windows: np.ndarray) -> None:
    status, reply = OpsHandler(lambda: model).handle("frobnicate", body(windows))
    error = error_of(reply)
    assert (status, error.error, error.op) == (404, "unknown_op", None)
    assert "frobnicate" in error.message


def test_hash_of_a_plain_model_sets_bits_above_the_code_median(
    model: Model, windows: np.ndarray
) -> None:
    status, reply = OpsHandler(lambda: model).handle("hash", body(windows))
    assert status == 200, reply
    doc = json.loads(reply)
    code = model.run(windows).code
    cut = np.asarray(model.manifest.code_median)
    assert doc["nbits"] == model.manifest.code_size
    assert doc["bits"] == [bits_to_hex(row > cut) for row in code]


def test_hash_on_a_model_file_without_a_hash_rule_is_409(model: Model, windows: np.ndarray) -> None:
    """Files exported before code_median existed: neither hashing nor a median to cut at."""
    old = copy.copy(model)
    old.manifest = model.manifest.model_copy(update={"code_median": None})
    status, reply = OpsHandler(lambda: old).handle("hash", body(windows))
    assert status == 409
    assert error_of(reply).error == "not_hashable"
    assert "re-export" in error_of(reply).message


def test_unexpected_exception_is_500_with_a_generic_message(
    model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    def control(op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        raise KeyError("secret detail")

    handler = OpsHandler(lambda: model, control=control)
    with caplog.at_level(logging.ERROR, logger="daemon.ops"):
        status, reply = handler.handle("unmute", b'{"stream": "pump-1", "id": "u"}')
    error = error_of(reply)
    assert (status, error.error, error.id) == (500, "internal", "u")
    assert "secret" not in error.message
    assert any(r.exc_info for r in caplog.records)  # the traceback is in the log


def test_requests_over_the_concurrency_cap_are_busy(model: Model, windows: np.ndarray) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_getter() -> Model:  # holds its slot until released
        entered.set()
        release.wait(10)
        return model

    handler = OpsHandler(slow_getter, max_concurrent=1)
    results: list[tuple[int, bytes]] = []
    first = threading.Thread(target=lambda: results.append(handler.handle("score", body(windows))))
    first.start()
    assert entered.wait(10)
    status, reply = handler.handle("score", body(windows))
    assert (status, error_of(reply).error) == (503, "busy")
    release.set()
    first.join(10)
    assert results[0][0] == 200
    assert handler.handle("score", body(windows))[0] == 200  # the slot came back


# -- control ops ----------------------------------------------------------------------------


class Recorder:
    """A control callback that records what it was given and answers like the main loop."""

    def __init__(self, status: int = 200) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status = status

    def __call__(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        self.calls.append((op, args))
        reply = ControlReply(op=op, id=args["id"], stream=args["stream"], ok=True)
        return self.status, reply.to_json()


def test_control_ops_are_validated_and_forwarded(model: Model) -> None:
    recorder = Recorder()
    handler = OpsHandler(lambda: model, control=recorder)
    requests = {
        "mute": {"stream": "pump-1", "duration_s": 3600, "reason": "maintenance", "id": "m"},
        "unmute": {"stream": "pump-1", "id": "u"},
        "sensitivity": {"stream": "pump-1", "factor": 2.5, "id": "s"},
    }
    for op, request in requests.items():
        status, reply = handler.handle(op, json.dumps(request).encode())
        assert status == 200
        assert ControlReply.model_validate_json(reply).op == op
    assert [op for op, _ in recorder.calls] == list(CONTROL_OPS)
    mute_args = recorder.calls[0][1]
    assert mute_args["duration_s"] == 3600.0
    assert mute_args["reason"] == "maintenance"
    assert recorder.calls[2][1]["factor"] == 2.5


@pytest.mark.parametrize(
    ("op", "request_body", "fragment"),
    [
        ("mute", {"stream": "pump-1", "duration_s": 0}, "duration_s"),
        ("mute", {"stream": "pump-1", "duration_s": 8 * 86400}, "duration_s"),
        ("mute", {"duration_s": 60}, "stream"),
        ("mute", {"stream": "a/b", "duration_s": 60}, "stream"),
        ("unmute", {"stream": "pump-1", "duration_s": 60}, "duration_s"),
        ("sensitivity", {"stream": "pump-1", "factor": 0.05}, "factor"),
        ("sensitivity", {"stream": "pump-1", "factor": 11}, "factor"),
        ("sensitivity", {"stream": "pump-1", "factor": "2"}, "factor"),
    ],
)
def test_invalid_control_request_is_refused_and_not_forwarded(
    model: Model, op: str, request_body: dict[str, Any], fragment: str
) -> None:
    recorder = Recorder()
    status, reply = OpsHandler(lambda: model, control=recorder).handle(
        op, json.dumps(request_body).encode()
    )
    error = error_of(reply)
    assert (status, error.error, error.op) == (400, "bad_request", op)
    assert fragment in error.message
    assert recorder.calls == []


def test_control_answer_passes_through(model: Model) -> None:
    seen: list[str] = []
    handler = OpsHandler(
        lambda: model, control=Recorder(status=404), observe=lambda op, r, s: seen.append(r)
    )
    status, reply = handler.handle("unmute", b'{"stream": "nope", "id": "1"}')
    assert status == 404
    assert ControlReply.model_validate_json(reply).stream == "nope"
    assert seen == ["refused"]


def test_control_ops_without_a_main_loop_are_unavailable(model: Model) -> None:
    status, reply = OpsHandler(lambda: model).handle("mute", b'{"stream": "p", "duration_s": 1}')
    assert (status, error_of(reply).error) == (503, "unavailable")


def test_every_op_name_is_known(model: Model) -> None:
    handler = OpsHandler(lambda: model, control=Recorder())
    for op in STATELESS_OPS + CONTROL_OPS:
        assert error_of(handler.handle(op, b"{}")[1]).error != "unknown_op"


# -- MQTT reply targets ---------------------------------------------------------------------

PREFIX = "oteo/ops/edge-1"


def test_v5_reply_goes_to_the_response_topic_with_correlation_data() -> None:
    props = SimpleNamespace(ResponseTopic="clients/7/reply", CorrelationData=b"\x00req-9")
    target = mqtt_reply_target(PREFIX, f"{PREFIX}/score", props, "ignored/when/v5")
    assert target == ReplyTarget("score", "clients/7/reply", b"\x00req-9")


def test_v5_reply_without_correlation_data() -> None:
    props = SimpleNamespace(ResponseTopic="r")
    assert mqtt_reply_target(PREFIX + "/", f"{PREFIX}/hash", props, None) == ReplyTarget(
        "hash", "r", None
    )


def test_v311_reply_goes_to_the_reply_to_field() -> None:
    assert mqtt_reply_target(PREFIX, f"{PREFIX}/encode", None, "clients/7") == ReplyTarget(
        "encode", "clients/7", None
    )
    # paho's Properties without a response topic set has no such attribute at all
    assert mqtt_reply_target(PREFIX, f"{PREFIX}/mute", SimpleNamespace(), "c") == ReplyTarget(
        "mute", "c", None
    )


def test_no_reply_target_gives_none() -> None:
    assert mqtt_reply_target(PREFIX, f"{PREFIX}/score", None, None) is None
    assert mqtt_reply_target(PREFIX, f"{PREFIX}/score", SimpleNamespace(), "a/#") is None


def test_topic_outside_the_prefix_is_a_bug() -> None:
    with pytest.raises(ValueError, match="not an op request"):
        mqtt_reply_target(PREFIX, "oteo/ops/other/score", None, "r")
    with pytest.raises(ValueError):
        mqtt_reply_target(PREFIX, f"{PREFIX}/", None, "r")
