"""The MQTT link: the only code that calls paho, all from one network thread it owns.

paho-mqtt 2.2 stalled QoS 1 publishing from a thread other than its network thread here (~66 %
acknowledged), so other threads never call paho: `publish()` appends to a queue and wakes the
network thread through a socketpair. That thread runs its own select() over [paho's socket, the
wake socket] and drives paho's external-loop API (loop_read / loop_write / loop_misc), connects
with capped, jittered back-off, and owns every piece of link state below.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import ConfigError, MqttSection
from daemon.throttle import Throttle

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

# A blackholed broker blocks the network thread this long per attempt (TCP connect, TLS
# handshake); publish() callers are not blocked, their messages wait in the queue.
_CONNECT_TIMEOUT_S = 3.0
_IDLE_WAIT_S = 1.0  # longest select(): keep-alive and back-off need no finer grain
_RETRY_WAIT_S = 0.05  # re-offer interval while on_message has no room (wake() cuts it short)
_DRAIN_BATCH = 1000  # messages handed to paho per iteration, so PUBACKs are read in between
_MAX_PAYLOAD_BYTES = 268_435_455 - 65_536  # the protocol's packet limit, less room for headers
_CAP_LOG_EVERY_S = 300.0  # at the back-off cap, repeat the warning this rarely
CONNECT_FAILURE_KINDS = (
    "network",  # DNS, TCP, time-out, connection closed before CONNACK (plain TCP)
    "tls",  # handshake, certificate, or closed before CONNACK over TLS
    "bad_credentials",
    "not_authorized",
    "server_unavailable",
    "refused_other",  # any other CONNACK refusal
)
_REFUSALS = {  # CONNACK reason code -> kind
    0x86: "bad_credentials",  # bad user name or password (v3.1.1 return code 4 maps here)
    0x8C: "bad_credentials",  # bad authentication method
    0x87: "not_authorized",  # (v3.1.1 return code 5)
    0x88: "server_unavailable",  # (v3.1.1 return code 3)
    0x89: "server_unavailable",  # server busy
}


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


@dataclass(slots=True)
class _Held:
    message: Incoming
    generation: int | None  # connection the QoS 1 message came on (None: nothing to ack)


class _Backoff:
    """Capped exponential back-off with jitter; also decides which failures earn a log line."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self._min_s, self._max_s = min_s, max_s
        self.step_s = 0.0  # 0: no failure since the last success
        self.failures = 0
        self._reason = ""
        self._logged_at = -math.inf

    def failure(self, reason: str, now: float) -> tuple[float, bool]:
        """The delay before the next attempt, and whether to log this failure."""
        grew = self.step_s < self._max_s
        self.step_s = self._min_s if self.step_s == 0 else min(2 * self.step_s, self._max_s)
        self.failures += 1
        worth_logging = grew or reason != self._reason or now - self._logged_at >= _CAP_LOG_EVERY_S
        self._reason = reason
        if worth_logging:
            self._logged_at = now
        # Up to 25 % shorter, so a fleet that lost its broker together does not return in step.
        return self.step_s * random.uniform(0.75, 1.0), worth_logging

    def reset(self) -> None:
        self.step_s, self.failures, self._reason = 0.0, 0, ""


_callback_bug_log = Throttle()


def _guarded(callback: Callable[_P, None]) -> Callable[_P, None]:
    """paho calls these in the middle of a packet: no exception may escape into paho."""

    @functools.wraps(callback)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            if _callback_bug_log.ready():
                log.exception("MQTT %s failed", callback.__name__)

    return guarded


class MqttLink:
    """One broker connection: subscribe, receive with manual ack, publish, last will."""

    def __init__(
        self,
        cfg: MqttSection,
        *,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        status_topic: str,
        online_payload: bytes,
        offline_payload: bytes,
        on_message: Callable[[Incoming], bool],
        outbox: OutboxLike | None = None,
        on_state: Callable[[LinkState, str], None] | None = None,
        counters: LinkCounters | None = None,
        max_queued: int = 100_000,
    ) -> None:
        self._cfg = cfg
        self._subscriptions = list(subscriptions)
        self._status_topic = status_topic
        self._online_payload = online_payload
        self._offline_payload = offline_payload
        self._on_message = on_message
        self._outbox = outbox
        self._on_state = on_state
        self.counters = counters if counters is not None else LinkCounters()
        self._max_queued = max_queued
        self._v5 = cfg.protocol == "5"
        self._client = self._make_client(client_id)

        # Shared with publishing threads: the queue (under the lock) and the wake socket.
        self._outbound: deque[Outgoing] = deque()
        self._outbound_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._connected = threading.Event()
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

        # Everything below belongs to the network thread.
        self._state = LinkState.DISCONNECTED
        self._connect_error = ""  # paho's last error while CONNECTING (it reports none else)
        self._backoff = _Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._next_attempt = 0.0
        self._ever_connected = False
        self._generation = 0  # bumped on every lost connection
        self._held: deque[_Held] = deque()
        # QoS 1 is bounded by Receive Maximum; QoS 0 beyond this is dropped and counted.
        self._max_held = max(1000, 10 * cfg.max_inflight)
        self._unacked: dict[int, int | None] = {}  # paho mid -> outbox id (None: not durable)
        self._inflight_limit = cfg.max_inflight
        self._durable_inflight = 0
        self._outbox_cursor = 0  # last outbox id handed to paho by this process
        self._outbox_drained = outbox is None
        self._subscribe_failure_logged = False
        self._stop_phase = ""
        self._stop_started = 0.0
        self._stop_deadline = 0.0
        self._offline_mid: int | None = None
        self._stop_result = False
        self._finished = False
        self._outbox_log = Throttle()
        self._callback_log = Throttle()
        self._loop_log = Throttle()
        self._refused_log = Throttle()

    # -- the caller's side ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of that connection."""
        return self._connected.is_set()

    @property
    def protocol_v5(self) -> bool:
        return self._v5

    @property
    def state(self) -> LinkState:
        return self._state

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or the timeout passes; True if connected."""
        return self._connected.wait(timeout_s)

    def start(self) -> None:
        """Start the network thread; it connects (and keeps reconnecting) on its own."""
        if self._thread is not None:
            raise RuntimeError("MqttLink.start() called twice")
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def publish(self, msg: Outgoing) -> None:
        """Queue a message for the network thread (thread-safe, never blocks on the network)."""
        if msg.qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {msg.qos}")
        if not msg.topic or "+" in msg.topic or "#" in msg.topic:
            raise ValueError(f"{msg.topic!r} is not a topic to publish on")
        if len(msg.payload) > _MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(msg.payload)} bytes is over MQTT's limit")
        with self._outbound_lock:
            if self._closed:
                self.counters.dropped_not_connected += 1
                return
            if len(self._outbound) >= self._max_queued:
                self.counters.dropped_queue_full += 1
                return
            was_empty = not self._outbound
            self._outbound.append(msg)
        # A non-empty queue already has a wake-up on its way, or is drained before the network
        # thread waits again (_wait_s): one wake-up per burst, not a send() per message.
        if was_empty:
            self.wake()

    def set_status(self, online_payload: bytes, offline_payload: bytes) -> None:
        """New status payloads (after a model reload): publish online now, offline at stop.

        The last will registered with the broker keeps the old payload until the next connect.
        """
        self._online_payload, self._offline_payload = online_payload, offline_payload
        self.publish(Outgoing(self._status_topic, online_payload, qos=1, retain=True))

    def wake(self) -> None:
        """Wake the network thread now (after publish, or when on_message has room again)."""
        # OSError: the buffer is full (a wake-up is pending anyway) or the link has stopped.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Flush, publish offline, disconnect cleanly; True if everything was acknowledged.

        Incoming messages are no longer offered or acknowledged, so the broker keeps them in
        the session. We do not unsubscribe: that would end the queueing while we are away.
        """
        if self._thread is None:
            self._closed = True
            self._set_state(LinkState.STOPPED, "stopped before start")
            return True
        if not self._stop_requested.is_set():
            self._stop_started = time.monotonic()
            self._stop_deadline = self._stop_started + timeout_s
            self._stop_requested.set()
            self.wake()
        self._thread.join(timeout_s + 1.0)
        return self._stop_result and not self._thread.is_alive()

    # -- paho client ------------------------------------------------------------------------

    def _make_client(self, client_id: str) -> paho.Client:
        cfg = self._cfg
        if self._v5:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
                reconnect_on_failure=False,
                manual_ack=True,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=False,
                protocol=MQTTProtocolVersion.MQTTv311,
                reconnect_on_failure=False,
                manual_ack=True,
            )
        paho_log = logging.getLogger(f"{__name__}.paho")
        if paho_log.isEnabledFor(logging.DEBUG):
            # Packet traces on demand only: otherwise paho logs each lost socket at ERROR,
            # beside our own rate-limited line.
            client.enable_logger(paho_log)
        client.suppress_exceptions = True  # a callback bug must not corrupt paho's packet state
        client.connect_timeout = _CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(self._max_queued)
        client.will_set(self._status_topic, self._offline_payload, qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls:
            try:
                client.tls_set(
                    ca_certs=_text(cfg.ca_file),
                    certfile=_text(cfg.cert_file),
                    keyfile=_text(cfg.key_file),
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt: cannot set up TLS: {exc}") from exc
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_paho_message
        return client

    def _set_connect_parameters(self) -> None:
        cfg = self._cfg
        if not self._v5:
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry_s
        # The broker never has more unacknowledged QoS 1 messages in flight to us than we hold.
        props.ReceiveMaximum = min(cfg.max_inflight, 65535)
        # clean_start=False on every connect: paho's default sends Clean Start = 1 on the first
        # connect of a process, and the broker would discard the backlog kept for us.
        self._client.connect_async(
            cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props
        )

    # -- the network thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._set_connect_parameters()
            while not self._finished:
                try:
                    self._step()
                except Exception:
                    # Never let the thread die: log, pause briefly, carry on.
                    if self._loop_log.ready():
                        log.exception("MQTT network loop error; continuing")
                    time.sleep(0.1)
        finally:
            self._close()

    def _step(self) -> None:
        now = time.monotonic()
        if self._stop_requested.is_set():
            self._advance_stop(now)
            if self._finished:
                return
        elif self._client.socket() is None and now >= self._next_attempt:
            self._connect()
        self._drain_outbound()
        if self._state is LinkState.CONNECTED:
            self._pump_outbox()
        if not self._stop_requested.is_set():
            self._deliver_held()
        self._service_socket(self._wait_s(now))

    def _connect(self) -> None:
        cfg = self._cfg
        self._set_state(LinkState.CONNECTING, f"connecting to {cfg.host}:{cfg.port}")
        # paho says why a connection closed before CONNACK only in its log (e.g. a TLS 1.3
        # server rejecting our client certificate after the handshake); listen while connecting
        # only, as formatting every packet's log line would cost on the hot path.
        self._connect_error = ""
        self._client.on_log = self._on_paho_log
        try:
            rc = self._client.reconnect()
        except ssl.SSLError as exc:  # also certificate verification failures
            self._connect_failed("tls", f"TLS: {exc}")
        except OSError as exc:
            self._connect_failed("network", exc.strerror or str(exc) or type(exc).__name__)
        except Exception as exc:
            self._connect_failed("network", f"{type(exc).__name__}: {exc}")
        else:
            if self._client.socket() is None and self._state is LinkState.CONNECTING:
                self._connect_failed("network", paho.error_string(rc))
        # Otherwise CONNECT is on its way; _on_connect or _on_disconnect says how it went. A
        # broker that never answers is dropped by paho's keep-alive check in loop_misc().

    def _connect_failed(self, kind: str, detail: str) -> None:
        self.counters.connect_failures[kind] += 1
        self._retry_later(f"cannot connect to MQTT broker {self._where()}: {detail}")

    def _retry_later(self, reason: str) -> None:
        now = time.monotonic()
        delay_s, worth_logging = self._backoff.failure(reason, now)
        self._next_attempt = now + delay_s
        if worth_logging:
            log.warning(
                "%s; retrying in %.1f s (%d failures in a row)",
                reason,
                delay_s,
                self._backoff.failures,
            )
        self._set_state(LinkState.DISCONNECTED, reason)

    def _wait_s(self, now: float) -> float:
        if self._outbound:
            return 0.0
        sock = self._client.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return 0.0  # decrypted bytes that select() cannot see
        wait_s = _IDLE_WAIT_S
        if self._stop_requested.is_set():
            return min(wait_s, _RETRY_WAIT_S)
        if sock is None:
            wait_s = min(wait_s, max(0.0, self._next_attempt - now))
        if self._held:
            wait_s = min(wait_s, _RETRY_WAIT_S)
        return wait_s

    def _service_socket(self, wait_s: float) -> None:
        client = self._client
        sock = client.socket()
        # Backpressure: with this many messages held, stop reading until the main loop takes
        # some (its wake-ups resume us). The broker should never send more than Receive Maximum
        # unacknowledged, but Mosquitto 2.0.11 floods a resumed session's whole backlog once
        # the first acknowledgements arrive, and QoS 0 has no such limit; TCP then holds it
        # instead of our memory. Writes (acks) go on, and paho's keep-alive only ends the
        # connection if nothing at all was read for a whole keepalive_s. Only while connected:
        # held QoS 1 messages of a lost connection wait for the next CONNACK, which must be
        # read (a full link that stopped reading then never delivered again).
        reading = sock is not None and (
            self._state is not LinkState.CONNECTED or len(self._held) < self._max_held
        )
        readers: list[Any] = [self._wake_r, sock] if reading else [self._wake_r]
        writers: list[Any] = [sock] if sock is not None and client.want_write() else []
        try:
            readable, writable, _ = select.select(readers, writers, [], wait_s)
        except (OSError, ValueError):
            return  # paho closed its socket under us; the next step sees it
        if self._wake_r in readable:
            self._drain_wake()
        if sock is None:
            return
        if reading and (sock in readable or (isinstance(sock, ssl.SSLSocket) and sock.pending())):
            client.loop_read()
        if sock in writable and client.socket() is not None:
            client.loop_write()
        client.loop_misc()  # keep-alive pings, and closing a connection that stopped answering

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass  # BlockingIOError: drained

    # -- outgoing ---------------------------------------------------------------------------

    def _drain_outbound(self) -> None:
        with self._outbound_lock:
            batch = [
                self._outbound.popleft() for _ in range(min(len(self._outbound), _DRAIN_BATCH))
            ]
        for msg in batch:
            if msg.durable:
                self._persist(msg)
            elif self._state is LinkState.CONNECTED:
                self._send(msg, None)
            else:
                # Retained state is re-published by the caller on reconnect (on_state).
                self._count_drop()

    def _count_drop(self) -> None:
        with self._outbound_lock:  # publish() counts into the same field from other threads
            self.counters.dropped_not_connected += 1

    def _persist(self, msg: Outgoing) -> None:
        # The outbox write happens here, when the network thread dequeues the message, so what a
        # crash can still lose is a message between publish() and this point: normally under a
        # millisecond, at worst a connect attempt (_CONNECT_TIMEOUT_S) — plus whatever the
        # outbox's own write policy leaves unsynced.
        if self._outbox is not None:
            try:
                self._outbox.add(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except Exception as exc:
                self._outbox_failed("add", exc)
            else:
                self._outbox_drained = False
                return
        # Best effort without persistence: paho keeps QoS 1 messages in memory while
        # disconnected and sends them after the next CONNACK.
        self._send(Outgoing(msg.topic, msg.payload, msg.qos, msg.retain), None)

    def _outbox_failed(self, action: str, exc: Exception) -> None:
        self.counters.outbox_errors += 1
        if self._outbox_log.ready():
            log.error(
                "outbox %s failed (%d outbox errors so far): %s",
                action,
                self.counters.outbox_errors,
                exc,
            )

    def _send(self, msg: Outgoing, outbox_id: int | None) -> int | None:
        """Hand one message to paho; its mid, or None if paho did not take it."""
        try:
            info = self._client.publish(
                msg.topic,
                msg.payload,
                qos=msg.qos,
                retain=msg.retain,
                properties=self._properties(msg),
            )
        except ValueError as exc:  # publish() checks what callers send; a corrupt outbox entry
            self.counters.publish_errors += 1
            if self._callback_log.ready():
                log.error("cannot publish on %s: %s", msg.topic, exc)
            if outbox_id is not None:
                self._outbox_ack(outbox_id)  # drop it, or it would block the outbox for good
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            with self._outbound_lock:
                self.counters.dropped_queue_full += 1
            return None
        if msg.qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._count_drop()
                return None
        else:
            # NO_CONN here still means taken: paho sends it after the next CONNACK. (The mid is
            # recorded after publish() returns; a PUBACK can only arrive in a later loop_read.)
            self._unacked[info.mid] = outbox_id
            self.counters.pending_unacked = len(self._unacked)
        self.counters.published += 1
        return info.mid

    def _properties(self, msg: Outgoing) -> Properties | None:
        if not self._v5 or (msg.response_topic is None and msg.correlation_data is None):
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if msg.response_topic is not None:
            props.ResponseTopic = msg.response_topic
        if msg.correlation_data is not None:
            props.CorrelationData = msg.correlation_data
        return props

    def _pump_outbox(self) -> None:
        """Hand outbox entries to paho oldest first, at most the in-flight limit unacknowledged.

        The cursor remembers what this process already handed over: after a reconnect paho
        retransmits those itself (same session), so they are not handed over twice. A fresh
        process starts at 0, so whatever a previous run left goes out before new events.
        """
        if self._outbox is None or self._outbox_drained:
            return
        room = self._inflight_limit - self._durable_inflight
        if room <= 0:
            return
        try:
            entries = self._outbox.next_after(self._outbox_cursor, room)
        except Exception as exc:
            self._outbox_failed("read", exc)
            return
        self._outbox_drained = len(entries) < room
        for entry in entries:
            if self._state is not LinkState.CONNECTED:
                self._outbox_drained = False
                return
            msg = Outgoing(entry.topic, entry.payload, entry.qos, entry.retain)
            if self._send(msg, entry.id) is None:
                self._outbox_drained = False
                return
            self._outbox_cursor = entry.id
            if entry.qos > 0:
                self._durable_inflight += 1
            else:
                self._outbox_ack(entry.id)  # QoS 0 is as delivered as it will ever be

    def _outbox_ack(self, outbox_id: int) -> None:
        assert self._outbox is not None
        try:
            self._outbox.ack(outbox_id)
        except Exception as exc:
            self._outbox_failed("ack", exc)  # sent again at the next start: a duplicate

    @_guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        # paho also calls this when a QoS 0 message is written; those mids are not in _unacked.
        if mid not in self._unacked:
            return
        outbox_id = self._unacked.pop(mid)
        self.counters.pending_unacked = len(self._unacked)
        self.counters.acked += 1
        if reason.is_failure:
            self.counters.publish_refused += 1
            if self._refused_log.ready():
                log.warning("broker refused a published message: %s", reason)
        if outbox_id is not None:
            self._durable_inflight -= 1
            self._outbox_ack(outbox_id)

    # -- incoming ---------------------------------------------------------------------------

    @_guarded
    def _on_paho_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        qos = message.qos
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.counters.bad_topics += 1
            if qos > 0:
                client.ack(message.mid, qos)  # it can never be processed; do not get it again
            return
        self.counters.received += 1
        if qos == 0 and len(self._held) >= self._max_held:
            self.counters.dropped_qos0 += 1
            return
        incoming = Incoming(
            topic,
            bytes(message.payload),
            qos,
            bool(message.retain),
            message.mid,
            message.properties,
            bool(message.dup),
        )
        self._held.append(_Held(incoming, self._generation if qos > 0 else None))
        self.counters.held_incoming = len(self._held)

    def _deliver_held(self) -> None:
        """Offer held messages in arrival order; stop at the first one that finds no room."""
        while self._held:
            held = self._held[0]
            if held.generation is not None and held.generation != self._generation:
                return  # came on a lost connection: the next CONNACK decides (_sort_held)
            try:
                taken = self._on_message(held.message)
            except Exception:
                # A message that crashes the callback is counted and acked: retrying it forever
                # would block everything behind it.
                self.counters.callback_errors += 1
                if self._callback_log.ready():
                    log.exception("on_message failed on %s", held.message.topic)
                taken = True
            if not taken:
                return
            self._held.popleft()
            self.counters.held_incoming = len(self._held)
            if held.generation is not None:
                self._client.ack(held.message.mid, held.message.qos)

    def _sort_held(self, session_present: bool) -> None:
        """Resolve QoS 1 messages held from a lost connection once the new CONNACK is in."""
        kept: deque[_Held] = deque()
        for held in self._held:
            if held.generation is None or held.generation == self._generation:
                kept.append(held)
            elif not session_present:
                # The broker lost the session: these are the only copies; deliver, never ack.
                kept.append(_Held(held.message, None))
            # else: the broker re-sends unacknowledged messages of the resumed session itself.
        self._held = kept
        self.counters.held_incoming = len(kept)

    # -- connection events --------------------------------------------------------------------

    @_guarded
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        client.on_log = None
        if reason.is_failure:
            # paho closes the socket after this; _on_disconnect then sees DISCONNECTED.
            kind = _REFUSALS.get(reason.value, "refused_other")
            self._connect_failed(kind, f"broker refused the connection: {reason}")
            return
        if self._backoff.failures:
            log.info(
                "connected to MQTT broker %s after %d failed attempts",
                self._where(),
                self._backoff.failures,
            )
        self._backoff.reset()
        self.counters.connects += 1
        if self._ever_connected:
            self.counters.reconnects += 1
        self._ever_connected = True
        self._sort_held(flags.session_present)
        limit = self._cfg.max_inflight
        if props is not None and hasattr(props, "ReceiveMaximum"):
            # The broker's own cap; paho's window cannot change on an open connection, but the
            # durable (outbox) window can.
            limit = min(limit, int(props.ReceiveMaximum))
        self._inflight_limit = limit
        self._subscribe_failure_logged = False
        if self._subscriptions:
            client.subscribe(self._subscriptions)
        self._send(Outgoing(self._status_topic, self._online_payload, qos=1, retain=True), None)
        self._set_state(
            LinkState.CONNECTED,
            f"connected to {self._where()} (session present: {flags.session_present})",
        )

    @_guarded
    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        # Only explicit refusals show here: a Mosquitto acl_file denial is silent (SUBACK grants
        # the subscription, no data ever arrives); the daemon's no-data metric covers that case.
        failed = [
            (topic, str(reason))
            for (topic, _), reason in zip(self._subscriptions, reasons, strict=False)
            if reason.is_failure
        ]
        self.counters.subscribe_acks += 1
        self.counters.subscribe_failures += len(failed)
        if failed and not self._subscribe_failure_logged:
            self._subscribe_failure_logged = True
            log.error(
                "broker refused subscriptions: %s",
                ", ".join(f"{topic} ({why})" for topic, why in failed),
            )

    @_guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self._state is LinkState.CONNECTED:
            self._generation += 1
            if self._stop_requested.is_set():
                self._set_state(LinkState.DISCONNECTED, "disconnected")
                return
            self.counters.disconnects += 1
            who = "broker closed" if flags.is_disconnect_packet_from_server else "lost"
            self._retry_later(f"MQTT connection to {self._where()} {who}: {reason}")
        elif self._state is LinkState.CONNECTING:
            client.on_log = None
            detail = f"connection closed before CONNACK: {self._connect_error or reason}"
            if not self._cfg.tls:
                self._connect_failed("network", detail)
                return
            # Over TLS this is how a broker refuses our certificate (or its absence): TLS 1.3
            # finishes the client's side of the handshake first, then the server closes, with
            # an alert or without one depending on timing.
            if self._cfg.cert_file is None:
                detail = f"the broker may require a client certificate (mqtt.cert_file); {detail}"
            self._connect_failed("tls", f"TLS: {detail}")

    def _on_paho_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._connect_error = buf

    def _set_state(self, state: LinkState, reason: str) -> None:
        if state is self._state:
            return
        self._state = state
        if state is LinkState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_state is not None:
            try:
                self._on_state(state, reason)
            except Exception:
                log.exception("on_state callback failed")

    def _where(self) -> str:
        return f"{self._cfg.host}:{self._cfg.port}"

    # -- stopping ---------------------------------------------------------------------------

    def _advance_stop(self, now: float) -> None:
        """flush -> offline -> closing -> finished, each phase bounded by the stop deadline."""
        budget = self._stop_deadline - self._stop_started
        connected = self._state is LinkState.CONNECTED
        if not self._stop_phase:
            self._stop_phase = "flush"
        if self._stop_phase == "flush":
            flushed = not self._outbound and (
                not connected or (self._outbox_drained and not self._unacked)
            )
            if not (flushed or now >= self._stop_started + 0.7 * budget):
                return
            if connected:
                offline = Outgoing(self._status_topic, self._offline_payload, qos=1, retain=True)
                self._offline_mid = self._send(offline, None)
            self._stop_phase = "offline"
        if self._stop_phase == "offline":
            waiting = connected and self._offline_mid in self._unacked
            if waiting and now < self._stop_started + 0.9 * budget:
                return
            # The offline status is in _unacked until its PUBACK, so it counts here too.
            self._stop_result = not self._outbound and not self._unacked and self._outbox_empty()
            if connected:
                self._client.disconnect()  # DISCONNECT: the broker discards the last will
            self._stop_phase = "closing"
        if self._stop_phase == "closing":
            if self._client.socket() is not None and now < self._stop_deadline:
                return  # DISCONNECT still waiting for the socket to take it
            self._finished = True

    def _outbox_empty(self) -> bool:
        if self._outbox is None:
            return True
        try:
            return len(self._outbox) == 0
        except Exception as exc:
            self._outbox_failed("count", exc)
            return False

    def _close(self) -> None:
        with self._outbound_lock:
            self._closed = True
            self.counters.dropped_not_connected += len(self._outbound)
            self._outbound.clear()
        sock = self._client.socket()
        if sock is not None:
            sock.close()  # gave up on a clean DISCONNECT: the broker publishes the last will
        self._wake_r.close()
        self._wake_w.close()
        self._set_state(LinkState.STOPPED, "stopped")


def _text(path: object) -> str | None:
    return None if path is None else str(path)
