"""The engine's outputs on MQTT: which topic, QoS, retain flag and durability each one gets.

The engine knows nothing of MQTT; it hands events, state changes, window scores and the end of a
stream to `Publisher`, which maps them to topics (`{output_prefix}/{stream}/event` ...) and to
the link. Events are durable (on-disk outbox until the broker acknowledges them); the retained
state and the status are re-sent after a reconnect instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daemon.messages import Event, StreamState, WindowScore
from daemon.metrics import Metrics
from daemon.mqtt import Outgoing


@dataclass(frozen=True, slots=True)
class StreamGone:
    """A stream was evicted: its retained state is cleared."""

    stream: str


Output = Event | StreamState | WindowScore | StreamGone


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic layout (DESIGN.md): readings in under one prefix, everything else under another."""

    input_prefix: str
    output_prefix: str
    instance: str

    def event(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/event"

    def state(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/state"

    def score(self, stream: str) -> str:
        return f"{self.output_prefix}/{stream}/score"

    @property
    def status(self) -> str:
        return f"{self.output_prefix}/status/{self.instance}"

    @property
    def ops(self) -> str:
        return f"{self.output_prefix}/ops/{self.instance}"

    def subscriptions(self, qos: int, per_channel: bool) -> list[tuple[str, int]]:
        """What the daemon subscribes to: readings (and per-channel values) and op requests."""
        subs = [(f"{self.input_prefix}/+/data", qos), (f"{self.ops}/+", 1)]
        if per_channel:
            subs.append((f"{self.input_prefix}/+/ch/+", qos))
        return subs


class Publisher:
    """Sends engine outputs through `send` (the MQTT link's queue); counts them by kind."""

    def __init__(
        self, topics: Topics, send: Callable[[Outgoing], None], metrics: Metrics, *, qos: int
    ) -> None:
        self.topics = topics
        self._send = send
        self._qos = qos
        published = metrics.mqtt_published_total
        self._count = {k: published.labels(kind=k) for k in ("event", "state", "score")}

    def __call__(self, out: Output) -> None:
        t = self.topics
        if isinstance(out, Event):
            self._out("event", t.event(out.stream), out.to_json(), self._qos, durable=True)
        elif isinstance(out, StreamState):
            self._out("state", t.state(out.stream), out.to_json(), 1, retain=True)
        elif isinstance(out, WindowScore):
            self._out("score", t.score(out.stream), out.to_json(), 0)
        else:
            # An empty retained message clears the stream's retained state on the broker.
            self._out("state", t.state(out.stream), b"", 1, retain=True)

    def _out(
        self,
        kind: str,
        topic: str,
        payload: bytes,
        qos: int,
        *,
        retain: bool = False,
        durable: bool = False,
    ) -> None:
        self._send(Outgoing(topic, payload, qos=qos, retain=retain, durable=durable))
        self._count[kind].inc()
