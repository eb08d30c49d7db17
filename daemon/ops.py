"""Operations on request: denoise / encode / hash / score windows, stream control, memory.

One handler serves both transports (HTTP and MQTT request/response): it takes the op name and
the raw request body and returns an HTTP status with the JSON reply, and never raises. Stateless
ops run in the caller's thread (onnxruntime sessions are thread-safe); control ops (mute, unmute,
sensitivity) are validated here and handed to the daemon's main loop, which owns stream state;
memory ops (similar, label) run in the caller's thread against the `Recall`, which is
thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, get_args

import numpy as np
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from daemon.model import Model, ScoreBatch
from daemon.recall import QueryError, Recall
from daemon.request import (
    OPS,
    ControlOp,
    DenoiseReply,
    EncodeReply,
    ErrorCode,
    ErrorReply,
    HashReply,
    LabelReply,
    LabelRequest,
    MemoryOp,
    MuteRequest,
    Op,
    OpRequest,
    ScoreReply,
    SensitivityRequest,
    SimilarReply,
    SimilarRequest,
    UnmuteRequest,
    bits_to_hex,
)

log = logging.getLogger(__name__)

STATELESS_OPS: tuple[Op, ...] = OPS  # ("denoise", "encode", "hash", "score")
CONTROL_OPS: tuple[ControlOp, ...] = get_args(ControlOp)  # ("mute", "unmute", "sensitivity")
MEMORY_OPS: tuple[MemoryOp, ...] = get_args(MemoryOp)  # ("similar", "label")
ALL_OPS: tuple[str, ...] = (*STATELESS_OPS, *CONTROL_OPS, *MEMORY_OPS)
_KNOWN_OPS: dict[str, Op | ControlOp | MemoryOp] = {
    name: name for name in (*STATELESS_OPS, *CONTROL_OPS, *MEMORY_OPS)
}
CONTROL_REQUESTS: dict[str, type[BaseModel]] = {
    "mute": MuteRequest,
    "unmute": UnmuteRequest,
    "sensitivity": SensitivityRequest,
}
MEMORY_REQUESTS: dict[str, type[BaseModel]] = {"similar": SimilarRequest, "label": LabelRequest}
# What each stateless op answers (the replies are built in `_reply`; this names them for docs).
REPLY_MODELS: dict[str, type[BaseModel]] = {
    "denoise": DenoiseReply,
    "encode": EncodeReply,
    "hash": HashReply,
    "score": ScoreReply,
    "similar": SimilarReply,
    "label": LabelReply,
}
# The `op` label of `observe` for names that are not ops: metric labels stay bounded.
UNKNOWN_OP = "unknown"
# `observe` results besides "ok" and the ErrorCode values: a control answer that was not 2xx.
REFUSED = "refused"

STATUS: dict[ErrorCode, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_op": 404,
    "not_hashable": 409,
    "too_large": 413,
    "internal": 500,
    "busy": 503,
    "unavailable": 503,
}
_MAX_MESSAGE = 300

_M = TypeVar("_M", bound=BaseModel)
Control = Callable[[str, dict[str, Any]], tuple[int, bytes]]
Observe = Callable[[str, str, float], None]


class OpError(Exception):
    """A refused request: the error code and a one-line message for the reply."""

    def __init__(self, error: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.error: ErrorCode = error
        self.message = message


def error_reply(
    error: ErrorCode, message: str, op: str | None = None, request_id: str | None = None
) -> bytes:
    """The JSON of an ErrorReply; `op` is left out when it is not a known op name."""
    known = _KNOWN_OPS.get(op) if op is not None else None
    return ErrorReply(op=known, error=error, message=message, id=request_id).to_json()


class OpsHandler:
    """Runs operation requests against the current model; every outcome is a JSON reply."""

    def __init__(
        self,
        model: Callable[[], Model],
        *,
        control: Control | None = None,
        recall: Recall | None = None,
        max_concurrent: int = 4,
        max_request_bytes: int = 1 << 20,
        max_windows: int = 256,
        observe: Observe | None = None,
    ) -> None:
        if max_concurrent < 1 or max_request_bytes < 1 or max_windows < 1:
            raise ValueError("max_concurrent, max_request_bytes and max_windows must be >= 1")
        self._model = model
        self._control = control
        self._recall = recall
        # Non-blocking acquire: over the cap a request is refused at once instead of queueing
        # behind slow ones (a client retries; a queue would only grow under overload).
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.max_request_bytes = max_request_bytes
        self.max_windows = max_windows
        self._observe = observe

    def handle(self, op: str, body: bytes) -> tuple[int, bytes]:
        """Run `op` on a JSON request body; return the HTTP status and the JSON reply."""
        start = time.perf_counter()
        try:
            status, reply = self._handle(op, body)
            result = "ok" if status < 300 else REFUSED
        except OpError as exc:
            status, result = STATUS[exc.error], exc.error
            reply = error_reply(exc.error, exc.message, op, self._request_id(body))
        except Exception:
            log.exception("op %r failed", op[:40])
            status, result = 500, "internal"
            message = "internal error; see the daemon log"
            reply = error_reply("internal", message, op, self._request_id(body))
        if self._observe is not None:
            label = op if op in _KNOWN_OPS else UNKNOWN_OP
            try:
                self._observe(label, result, time.perf_counter() - start)
            except Exception:
                log.exception("observe callback failed")
        return status, reply

    def _request_id(self, body: bytes) -> str | None:
        """The request's `id` for an error reply, when the body is a JSON object that has one."""
        return _id_of(body) if len(body) <= self.max_request_bytes else None

    def _handle(self, op: str, body: bytes) -> tuple[int, bytes]:
        if op not in _KNOWN_OPS:
            known = ", ".join(ALL_OPS)
            raise OpError("unknown_op", f"unknown op {op[:40]!r}; known ops: {known}")
        if len(body) > self.max_request_bytes:
            raise OpError(
                "too_large", f"request of {len(body)} bytes exceeds {self.max_request_bytes}"
            )
        control = self._control
        if op in CONTROL_REQUESTS and control is None:
            raise OpError("unavailable", f"{op} is not available: no stream control here")
        if op in MEMORY_REQUESTS and self._recall is None:
            raise OpError("unavailable", f"{op} is not available: no event journal here")
        if not self._slots.acquire(blocking=False):
            raise OpError("busy", "too many requests in flight; retry shortly")
        try:
            if control is not None and op in CONTROL_REQUESTS:
                # The main loop owns stream state and answers; this thread only validates.
                return control(op, _parse(CONTROL_REQUESTS[op], body).model_dump())
            if op in MEMORY_REQUESTS:
                return 200, self._run_memory(op, body)
            return 200, self._run_stateless(op, body)
        finally:
            self._slots.release()

    def _run_memory(self, op: str, body: bytes) -> bytes:
        recall = self._recall
        assert recall is not None
        try:
            if op == "label":
                return recall.label(_parse(LabelRequest, body)).to_json()
            return recall.similar(_parse(SimilarRequest, body), self._model()).to_json()
        except QueryError as exc:
            raise OpError(exc.code, str(exc)) from exc

    def _run_stateless(self, op: str, body: bytes) -> bytes:
        model = self._model()  # once: a hot reload mid-request does not mix two models
        manifest = model.manifest
        if op == "hash" and manifest.hash_cut() is None:
            raise OpError(
                "not_hashable",
                f"model {manifest.name} v{manifest.version} has no hash rule (exported before "
                "code_median existed); re-export it, or train with --hashing",
            )
        request = _parse(OpRequest, body)
        count, limit = len(request.windows), self.max_windows
        if count > limit:
            raise OpError("bad_request", f"{count} windows exceed the limit of {limit} per request")
        with np.errstate(over="ignore"):  # finite JSON numbers can overflow float32: below
            windows = request.array()
        try:
            model.check_windows(windows)
        except ValueError as exc:
            raise OpError("bad_request", str(exc)) from exc
        if not np.isfinite(windows).all():
            raise OpError("bad_request", "windows values must be within float32 range")
        return _reply(op, model, model.run(windows), request.id)


def _reply(op: str, model: Model, out: ScoreBatch, request_id: str | None) -> bytes:
    if op == "denoise":
        return DenoiseReply(reconstruction=out.reconstruction.tolist(), id=request_id).to_json()
    if op == "encode":
        return EncodeReply(code=out.code.tolist(), id=request_id).to_json()
    if op == "hash":
        cut = model.manifest.hash_cut()
        assert cut is not None  # checked before the run
        bits = [bits_to_hex(row > cut) for row in out.code]
        return HashReply(bits=bits, nbits=out.code.shape[1], id=request_id).to_json()
    quantiles = model.manifest.score_quantiles
    return ScoreReply(
        score=out.score.tolist(),
        p_value=[quantiles.p_value(float(s)) for s in out.score],
        channel_score=out.channel_score.tolist(),
        threshold=model.manifest.alarm.enter_threshold,
        id=request_id,
    ).to_json()


def _parse(model: type[_M], body: bytes) -> _M:
    """Validate a request body; a refusal names the first problem in one line."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        text = f"{where}: {message}" if where else message
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more)"
        raise OpError("bad_request", " ".join(text.split())[:_MAX_MESSAGE]) from exc


def _id_of(body: bytes) -> str | None:
    try:
        raw = from_json(body, allow_inf_nan=True)
    except ValueError:
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= 200 else None


class ReplyTarget(NamedTuple):
    """Where to publish the reply to an MQTT op request."""

    op: str
    topic: str
    correlation_data: bytes | None  # v5 CorrelationData, echoed in the reply's properties


def mqtt_reply_target(
    op_topic_prefix: str, topic: str, properties: Any, payload_reply_to: str | None
) -> ReplyTarget | None:
    """The op and reply topic of a request on `{op_topic_prefix}/{op}`; None: nowhere to reply.

    MQTT v5: the ResponseTopic property (CorrelationData echoed); 3.1.1: the request's
    `reply_to` field. `properties` is paho's Properties or anything with those attributes.
    Raises ValueError for a topic outside the prefix (a subscription bug, not a bad request).
    """
    prefix = op_topic_prefix.rstrip("/") + "/"
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        raise ValueError(f"topic {topic!r} is not an op request under {prefix!r}")
    op = topic[len(prefix) :]
    response_topic = getattr(properties, "ResponseTopic", None)
    if isinstance(response_topic, str) and _publishable(response_topic):
        correlation = getattr(properties, "CorrelationData", None)
        return ReplyTarget(op, response_topic, bytes(correlation) if correlation else None)
    if payload_reply_to is not None and _publishable(payload_reply_to):
        return ReplyTarget(op, payload_reply_to, None)
    return None


def _publishable(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic
