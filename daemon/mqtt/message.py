"""What crosses the MQTT link's boundary: messages in and out, link state, its counters."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

CONNECT_FAILURE_KINDS = (
    "network",  # DNS, TCP, time-out, connection closed before CONNACK (plain TCP)
    "tls",  # handshake, certificate, or closed before CONNACK over TLS
    "bad_credentials",
    "not_authorized",
    "server_unavailable",
    "refused_other",  # any other CONNACK refusal
)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from the broker, as offered to `on_message`."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    properties: Any  # paho Properties (v5: ResponseTopic, CorrelationData) or None (v3.1.1)
    dup: bool = False  # the broker says it may have sent this before


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish; `durable` ones go through the outbox (no v5 properties there)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    durable: bool = False


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass(slots=True)
class LinkCounters:
    """What the link did, for metrics; written by the network thread (plain ints, safe to read)."""

    connects: int = 0  # successful CONNACKs
    reconnects: int = 0  # successful CONNACKs after the first
    disconnects: int = 0  # established connections that were lost
    # By kind; every key exists from the start, so a metrics thread can iterate it safely.
    connect_failures: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(CONNECT_FAILURE_KINDS, 0)
    )
    subscribe_acks: int = 0  # SUBACKs (one per connection when there are subscriptions)
    subscribe_failures: int = 0  # SUBACK failure codes
    received: int = 0
    dropped_qos0: int = 0  # QoS 0 arriving while the held bound is full
    bad_topics: int = 0  # topics that are not UTF-8
    held_incoming: int = 0  # offered to on_message but not taken yet
    callback_errors: int = 0
    published: int = 0  # handed to paho
    acked: int = 0  # PUBACKs
    publish_refused: int = 0  # PUBACKs with a failure reason code
    dropped_not_connected: int = 0
    dropped_queue_full: int = 0
    publish_errors: int = 0  # paho rejected the message itself
    pending_unacked: int = 0
    outbox_errors: int = 0


class OutboxEntry(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...


class OutboxLike(Protocol):
    """Durable storage of outgoing messages until the broker acknowledges them; ids increase."""

    def add(self, topic: str, payload: bytes, /, *, qos: int, retain: bool) -> int: ...
    def next_after(self, after_id: int, limit: int, /) -> Sequence[OutboxEntry]: ...
    def ack(self, entry_id: int, /) -> None: ...
    def __len__(self) -> int: ...
