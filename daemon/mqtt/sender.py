"""Outgoing messages: the publish queue, the durable outbox, and the broker's acknowledgements.

Other threads only append to the queue (`enqueue`, under a lock); everything else runs in the
network thread. Durable messages (events) are written to the outbox when the network thread
dequeues them and deleted when the broker acknowledges them; the outbox is pumped oldest first
with at most the in-flight limit unacknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.mqtt.message import LinkCounters, OutboxLike, Outgoing
from daemon.throttle import Throttle

log = logging.getLogger(__name__)

DRAIN_BATCH = 1000  # messages handed to paho per iteration, so PUBACKs are read in between


class Sender:
    """The link's outgoing side; see the module docstring."""

    def __init__(
        self,
        client: paho.Client,
        counters: LinkCounters,
        outbox: OutboxLike | None,
        *,
        v5: bool,
        max_queued: int,
        inflight_limit: int,
    ) -> None:
        self._client = client
        self.counters = counters
        self._outbox = outbox
        self._v5 = v5
        self._max_queued = max_queued
        # Shared with publishing threads, under the lock.
        self._outbound: deque[Outgoing] = deque()
        self._lock = threading.Lock()
        self._closed = False
        # Network thread only.
        self.unacked: dict[int, int | None] = {}  # paho mid -> outbox id (None: not durable)
        # QoS 0 messages paho took but has not written yet: paho drops them when the connection
        # goes, without a word (`connection_lost` counts them).
        self._qos0_unwritten = 0
        self.inflight_limit = inflight_limit
        self._durable_inflight = 0
        self._outbox_cursor = 0  # last outbox id handed to paho by this process
        self.outbox_drained = outbox is None
        self._outbox_log = Throttle()
        self._publish_log = Throttle()
        self._refused_log = Throttle()

    # -- any thread --------------------------------------------------------------------------

    def enqueue(self, msg: Outgoing) -> bool:
        """Queue a message; True if the queue was empty (the caller wakes the network thread)."""
        with self._lock:
            if self._closed:
                self.counters.dropped_not_connected += 1
                return False
            if len(self._outbound) >= self._max_queued:
                self.counters.dropped_queue_full += 1
                return False
            was_empty = not self._outbound
            self._outbound.append(msg)
        return was_empty

    @property
    def queued(self) -> bool:
        return bool(self._outbound)

    # -- network thread ----------------------------------------------------------------------

    def drain(self, connected: bool) -> None:
        """Hand queued messages to paho (durable ones to the outbox first)."""
        with self._lock:
            batch = [self._outbound.popleft() for _ in range(min(len(self._outbound), DRAIN_BATCH))]
        for msg in batch:
            if msg.durable:
                self._persist(msg)
            elif connected:
                self.send(msg, None)
            else:
                # Retained state is re-published by the caller on reconnect (on_state).
                self._count_drop()

    def send(self, msg: Outgoing, outbox_id: int | None) -> int | None:
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
            if self._publish_log.ready():
                log.error("cannot publish on %s: %s", msg.topic, exc)
            if outbox_id is not None:
                self._outbox_ack(outbox_id)  # drop it, or it would block the outbox for good
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            with self._lock:
                self.counters.dropped_queue_full += 1
            return None
        if msg.qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._count_drop()
                return None
            self._qos0_unwritten += 1
        else:
            # NO_CONN here still means taken: paho sends it after the next CONNACK. (The mid is
            # recorded after publish() returns; a PUBACK can only arrive in a later loop_read.)
            self.unacked[info.mid] = outbox_id
            self.counters.pending_unacked = len(self.unacked)
        self.counters.published += 1
        return info.mid

    def pump_outbox(self, connected: Callable[[], bool]) -> None:
        """Hand outbox entries to paho oldest first, at most the in-flight limit unacknowledged.

        The cursor remembers what this process already handed over: after a reconnect paho
        retransmits those itself (same session), so they are not handed over twice. A fresh
        process starts at 0, so whatever a previous run left goes out before new events.
        """
        if self._outbox is None or self.outbox_drained:
            return
        room = self.inflight_limit - self._durable_inflight
        if room <= 0:
            return
        try:
            entries = self._outbox.next_after(self._outbox_cursor, room)
        except Exception as exc:
            self._outbox_failed("read", exc)
            return
        self.outbox_drained = len(entries) < room
        for entry in entries:
            if not connected():
                self.outbox_drained = False
                return
            msg = Outgoing(entry.topic, entry.payload, entry.qos, entry.retain)
            if self.send(msg, entry.id) is None:
                self.outbox_drained = False
                return
            self._outbox_cursor = entry.id
            if entry.qos > 0:
                self._durable_inflight += 1
            else:
                self._outbox_ack(entry.id)  # QoS 0 is as delivered as it will ever be

    def acknowledged(self, mid: int, reason: ReasonCode) -> None:
        """A PUBACK, or a QoS 0 message written to the socket (its mid is not tracked)."""
        if mid not in self.unacked:
            self._qos0_unwritten = max(0, self._qos0_unwritten - 1)
            return
        outbox_id = self.unacked.pop(mid)
        self.counters.pending_unacked = len(self.unacked)
        self.counters.acked += 1
        if reason.is_failure:
            self.counters.publish_refused += 1
            if self._refused_log.ready():
                log.warning("broker refused a published message: %s", reason)
        if outbox_id is not None:
            self._durable_inflight -= 1
            self._outbox_ack(outbox_id)

    def connection_lost(self) -> None:
        """The connection closed: QoS 0 messages paho had not written are gone; count them."""
        if self._qos0_unwritten:
            with self._lock:  # enqueue() counts into the same field from other threads
                self.counters.dropped_not_connected += self._qos0_unwritten
            self._qos0_unwritten = 0

    def outbox_empty(self) -> bool:
        if self._outbox is None:
            return True
        try:
            return len(self._outbox) == 0
        except Exception as exc:
            self._outbox_failed("count", exc)
            return False

    def close(self) -> None:
        """Refuse further messages; what is still queued is counted as dropped."""
        with self._lock:
            self._closed = True
            self.counters.dropped_not_connected += len(self._outbound)
            self._outbound.clear()

    def _count_drop(self) -> None:
        with self._lock:  # enqueue() counts into the same field from other threads
            self.counters.dropped_not_connected += 1

    def _persist(self, msg: Outgoing) -> None:
        # The outbox write happens here, when the network thread dequeues the message, so what a
        # crash can still lose is a message between publish() and this point: normally under a
        # millisecond, at worst a connect attempt (CONNECT_TIMEOUT_S) — plus whatever the
        # outbox's own write policy leaves unsynced.
        if self._outbox is not None:
            try:
                self._outbox.add(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except Exception as exc:
                self._outbox_failed("add", exc)
            else:
                self.outbox_drained = False
                return
        # Best effort without persistence: paho keeps QoS 1 messages in memory while
        # disconnected and sends them after the next CONNACK.
        self.send(Outgoing(msg.topic, msg.payload, msg.qos, msg.retain), None)

    def _properties(self, msg: Outgoing) -> Properties | None:
        if not self._v5 or (msg.response_topic is None and msg.correlation_data is None):
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if msg.response_topic is not None:
            props.ResponseTopic = msg.response_topic
        if msg.correlation_data is not None:
            props.CorrelationData = msg.correlation_data
        return props

    def _outbox_ack(self, outbox_id: int) -> None:
        assert self._outbox is not None
        try:
            self._outbox.ack(outbox_id)
        except Exception as exc:
            self._outbox_failed("ack", exc)  # sent again at the next start: a duplicate

    def _outbox_failed(self, action: str, exc: Exception) -> None:
        self.counters.outbox_errors += 1
        if self._outbox_log.ready():
            log.error(
                "outbox %s failed (%d outbox errors so far): %s",
                action,
                self.counters.outbox_errors,
                exc,
            )
