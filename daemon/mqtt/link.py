"""The MQTT link: the only code that calls paho, all from one network thread it owns.

paho-mqtt 2.2 stalled QoS 1 publishing from a thread other than its network thread here (~66 %
acknowledged), so other threads never call paho: `publish()` appends to a queue and wakes the
network thread through a socketpair. That thread runs its own select() over [paho's socket, the
wake socket] and drives paho's external-loop API (loop_read / loop_write / loop_misc), connects
with capped, jittered back-off, and owns every piece of link state: the `Inbox` (received, not
yet taken), the `Sender` (queued, outbox, unacknowledged) and the connection itself.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import MqttSection
from daemon.mqtt.client import make_client, set_connect_parameters
from daemon.mqtt.connection import Connection, guarded
from daemon.mqtt.inbox import Inbox
from daemon.mqtt.ledger import AckLedger
from daemon.mqtt.message import Incoming, LinkCounters, LinkState, OutboxLike, Outgoing
from daemon.mqtt.sender import Sender
from daemon.mqtt.shutdown import Shutdown
from daemon.throttle import Throttle

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0  # longest select(): keep-alive and back-off need no finer grain
_RETRY_WAIT_S = 0.05  # re-offer interval while on_message has no room (wake() cuts it short)
_MAX_PAYLOAD_BYTES = 268_435_455 - 65_536  # the protocol's packet limit, less room for headers


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
        ledger: AckLedger | None = None,
    ) -> None:
        self._cfg = cfg
        self._subscriptions = list(subscriptions)
        self._status_topic = status_topic
        self._online_payload = online_payload
        self._offline_payload = offline_payload
        self.counters = counters if counters is not None else LinkCounters()
        self._v5 = cfg.protocol == "5"
        self._client = make_client(
            cfg,
            client_id,
            status_topic=status_topic,
            offline_payload=offline_payload,
            max_queued=max_queued,
        )
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_paho_message
        # QoS 1 is bounded by Receive Maximum; QoS 0 beyond this is dropped and counted.
        self._inbox = Inbox(
            on_message, self.counters, max(1000, 10 * cfg.max_inflight), ledger=ledger
        )
        self._sender = Sender(
            self._client,
            self.counters,
            outbox,
            v5=self._v5,
            max_queued=max_queued,
            inflight_limit=cfg.max_inflight,
        )
        # Shared with other threads: the wake socket, the connected flag, the stop request.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = threading.Event()
        self._shutdown: Shutdown | None = None
        self._thread: threading.Thread | None = None
        self._conn = Connection(
            cfg,
            self._client,
            counters=self.counters,
            inbox=self._inbox,
            sender=self._sender,
            subscriptions=subscriptions,
            online=lambda: Outgoing(self._status_topic, self._online_payload, 1, True),
            on_state=on_state,
            stopping=self._stop_requested,
            client_id=client_id,
        )
        self._loop_log = Throttle()

    # -- the caller's side ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of that connection."""
        return self._conn.connected.is_set()

    @property
    def protocol_v5(self) -> bool:
        return self._v5

    @property
    def state(self) -> LinkState:
        return self._conn.state

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or the timeout passes; True if connected."""
        return self._conn.connected.wait(timeout_s)

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
        # A non-empty queue already has a wake-up on its way, or is drained before the network
        # thread waits again (_wait_s): one wake-up per burst, not a send() per message.
        if self._sender.enqueue(msg):
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
            self._sender.close()
            self._conn.set_state(LinkState.STOPPED, "stopped before start")
            return True
        self.request_stop(timeout_s)
        self._thread.join(timeout_s + 1.0)
        shutdown = self._shutdown
        return shutdown is not None and shutdown.result and not self._thread.is_alive()

    def request_stop(self, timeout_s: float = 5.0) -> None:
        """Start a clean stop without waiting for it (`stop` waits): stop several at once."""
        if self._thread is not None and not self._stop_requested.is_set():
            self._shutdown = Shutdown(time.monotonic(), timeout_s)
            self._stop_requested.set()
            self.wake()

    # -- the network thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            set_connect_parameters(self._client, self._cfg)
            while self._shutdown is None or not self._shutdown.finished:
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
        stopping = self._stop_requested.is_set()
        if stopping and self._shutdown is not None:
            offline = Outgoing(self._status_topic, self._offline_payload, qos=1, retain=True)
            self._shutdown.advance(now, self._conn.up, self._client, self._sender, offline)
            if self._shutdown.finished:
                return
        elif self._client.socket() is None and now >= self._conn.next_attempt:
            self._conn.connect()
        ledger = self._inbox.ledger
        if ledger is not None and self._conn.up:
            for mid in ledger.release(self._inbox.generation):
                self._client.ack(mid, 1)
        self._sender.drain(self._conn.up)
        if self._conn.up:
            self._sender.pump_outbox(lambda: self._conn.up)
        if not stopping:
            self._inbox.deliver(self._client)
        self._service_socket(self._wait_s(now))

    def _wait_s(self, now: float) -> float:
        if self._sender.queued:
            return 0.0
        sock = self._client.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return 0.0  # decrypted bytes that select() cannot see
        wait_s = _IDLE_WAIT_S
        if self._stop_requested.is_set():
            return min(wait_s, _RETRY_WAIT_S)
        if sock is None:
            wait_s = min(wait_s, max(0.0, self._conn.next_attempt - now))
        if len(self._inbox):
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
        # read (a full link that stopped reading then never delivered again). While stopping,
        # reads go on whatever the inbox holds: the offline status's PUBACK must come in, and
        # what arrives is never acknowledged, so the broker keeps it for the next start.
        stopping = self._stop_requested.is_set()
        reading = sock is not None and (not self._conn.up or not self._inbox.full or stopping)
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

    # -- paho callbacks (network thread, inside loop_read / loop_misc) -----------------------

    @guarded
    def _on_paho_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        self._inbox.receive(client, message)

    @guarded
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        self._sender.acknowledged(mid, reason)

    # -- state -------------------------------------------------------------------------------

    def _close(self) -> None:
        self._sender.close()
        sock = self._client.socket()
        if sock is not None:
            sock.close()  # gave up on a clean DISCONNECT: the broker publishes the last will
        self._wake_r.close()
        self._wake_w.close()
        self._conn.set_state(LinkState.STOPPED, "stopped")
