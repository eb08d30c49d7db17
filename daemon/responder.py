"""Answers operation requests that arrive over MQTT (`{output_prefix}/ops/{instance}/{op}`).

Requests are handed from the network thread to two worker threads, so a slow op never delays
readings; the backlog is bounded (beyond it a request is counted as `busy` and gets no reply —
the caller times out — rather than queueing without limit). The reply goes to the MQTT v5
response topic with its correlation data or, from any client, to a `reply_to` field in the
request (MQTT 3.1.1 clients have no response topic).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from daemon.metrics import Metrics
from daemon.mqtt import Incoming, Outgoing
from daemon.ops import ALL_OPS, UNKNOWN_OP, OpsHandler, mqtt_reply_target

MAX_PENDING_OPS = 256  # MQTT ops requests queued for the two ops workers
_KNOWN = frozenset(ALL_OPS)


class Responder:
    """Runs MQTT op requests off the network thread and publishes the replies."""

    def __init__(
        self,
        ops: OpsHandler,
        ops_prefix: str,
        send: Callable[[Outgoing], None],
        metrics: Metrics,
    ) -> None:
        self._ops = ops
        self._prefix = ops_prefix
        self._send = send
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oteo-ops")
        self._slots = threading.BoundedSemaphore(MAX_PENDING_OPS)

    def submit(self, msg: Incoming) -> None:
        """Queue one request (network thread); never blocks."""
        if not self._slots.acquire(blocking=False):
            self._metrics.ops_total.labels(op=op_label(msg.topic), result="busy").inc()
            return
        self._pool.submit(self._run, msg)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, msg: Incoming) -> None:
        try:
            self._answer(msg)
        finally:
            self._slots.release()

    def _answer(self, msg: Incoming) -> None:
        op = msg.topic.rsplit("/", 1)[-1]
        _status, reply = self._ops.handle(op, msg.payload)
        target = mqtt_reply_target(self._prefix, msg.topic, msg.properties, reply_to(msg.payload))
        if target is None:
            self._metrics.ops_total.labels(op=op_label(msg.topic), result="no_reply_topic").inc()
            return
        self._send(Outgoing(target.topic, reply, qos=1, correlation_data=target.correlation_data))
        self._metrics.mqtt_published_total.labels(kind="reply").inc()


def op_label(topic: str) -> str:
    """The `op` metric label of a request topic (unknown ops share one label)."""
    op = topic.rsplit("/", 1)[-1]
    return op if op in _KNOWN else UNKNOWN_OP


def reply_to(payload: bytes) -> str | None:
    """The request's `reply_to` field, if it is a JSON object that has a string one."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    value = doc.get("reply_to") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
