"""Operator controls (mute, unmute, sensitivity) and stream snapshots, across threads.

Stream state belongs to the main loop. HTTP and MQTT op threads put a request here and wait
(bounded) for the main loop to run it between two batches of readings and set the reply.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from daemon.engine import Engine
from daemon.messages import format_ts
from daemon.ops import CONTROL_OPS, error_reply
from daemon.request import ControlReply

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 2.0
_BUSY = (503, error_reply("busy", "main loop did not answer in time"))


@dataclass
class _Request:
    op: str
    args: dict[str, Any]
    reply: Future[Any] = field(default_factory=Future)


class Controls:
    """Requests from other threads, answered by the main loop's `run`."""

    def __init__(self, on_error: Callable[[], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._on_error = on_error

    # -- other threads -----------------------------------------------------------------------

    def call(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """Run a control op in the main loop; the HTTP status and JSON reply."""
        request = _Request(op, args)
        self._queue.put(request)
        try:
            result: tuple[int, bytes] = request.reply.result(timeout=CONTROL_TIMEOUT_S)
        except FutureTimeout:
            return _BUSY
        return result

    def snapshot(self) -> list[dict[str, Any]]:
        """Every stream's state for /v1/streams ([] if the main loop does not answer in time)."""
        request = _Request("_describe", {})
        self._queue.put(request)
        try:
            result: list[dict[str, Any]] = request.reply.result(timeout=CONTROL_TIMEOUT_S)
        except FutureTimeout:
            return []
        return result

    def post(self, op: str) -> None:
        """Ask the main loop for an internal action (no reply): `_republish`."""
        self._queue.put(_Request(op, {}))

    # -- main loop ---------------------------------------------------------------------------

    def run(self, engine: Engine, republish: Callable[[], None]) -> None:
        """Answer every waiting request."""
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request.op == "_republish":
                republish()
            elif request.op == "_describe":
                request.reply.set_result(describe(engine))
            else:
                try:
                    request.reply.set_result(apply(engine, request.op, request.args))
                except Exception:  # reply, never kill the main loop
                    log.exception("control %s failed", request.op)
                    if self._on_error is not None:
                        self._on_error()
                    message = "internal error; see the daemon log"
                    request.reply.set_result((500, error_reply("internal", message, request.op)))


def apply(engine: Engine, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
    """Run one validated control request against the engine's streams."""
    stream_id = str(args["stream"])
    if op not in CONTROL_OPS:
        return 404, error_reply("unknown_op", f"unknown control op {op[:40]!r}")
    # Only streams the engine tracks: creating one would track a stream nobody publishes and,
    # at the stream cap, evict one that does.
    stream = engine.streams.get(stream_id)
    if stream is None:
        message = f"no stream {stream_id[:100]!r} is tracked (it has sent no reading yet)"
        return 404, error_reply("not_found", message, op, args.get("id"))
    until = None
    if op == "mute":
        stream.muted_until = engine.clock() + float(args["duration_s"])
        engine.episodes.set_state(stream, "muted", time.time())
        until = time.time() + float(args["duration_s"])
    elif op == "unmute":
        stream.muted_until = 0.0
        engine.episodes.end_mute(stream, time.time())
    else:
        engine.set_sensitivity(stream, float(args["factor"]))
    reply = ControlReply(
        op=op,
        id=args.get("id"),
        stream=stream_id,
        ok=True,
        state=stream.state,
        until=format_ts(until) if until else None,
    )
    return 200, reply.to_json()


def describe(engine: Engine) -> list[dict[str, Any]]:
    """A snapshot of every stream for /v1/streams."""
    return [
        {
            "stream": s.id,
            "state": s.state,
            "score": s.last_score,
            "threshold": s.detector.threshold,
            "threshold_source": s.detector.threshold_source,
            "sensitivity": s.detector.sensitivity,
            "event_id": s.alarm.event_id if s.alarm else None,
            "suppressed_by": s.alarm.suppressed_by if s.alarm else None,
            "last_ts": format_ts(s.last_ts) if s.last_ts else None,
        }
        for s in engine.streams.values()
    ]
