"""Messages received from the broker and not yet taken by the daemon (network thread only).

A QoS 1 message is acknowledged only once `on_message` has taken it; while it has no room, the
message waits here and the broker keeps the rest. Messages of a lost connection wait for the next
CONNACK, which says whether the broker kept the session (then it re-sends them itself).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho

from daemon.mqtt.ledger import AckLedger
from daemon.mqtt.message import Incoming, LinkCounters
from daemon.throttle import Throttle

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    message: Incoming
    generation: int | None  # connection the QoS 1 message came on (None: nothing to ack)


class Inbox:
    """Held incoming messages, offered to `on_message` in arrival order."""

    def __init__(
        self,
        on_message: Callable[[Incoming], bool],
        counters: LinkCounters,
        max_held: int,
        ledger: AckLedger | None = None,
    ) -> None:
        self._on_message = on_message
        self.ledger = ledger  # acks held until a checkpoint (partition sessions)
        self.counters = counters
        self.max_held = max_held
        self.generation = 0  # bumped on every lost connection
        self._held: deque[_Held] = deque()
        self._callback_log = Throttle()

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return len(self._held) >= self.max_held

    def receive(self, client: paho.Client, message: paho.MQTTMessage) -> None:
        """Hold one message from paho (QoS 0 beyond the bound is dropped and counted)."""
        qos = message.qos
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.counters.bad_topics += 1
            if qos > 0:
                client.ack(message.mid, qos)  # it can never be processed; do not get it again
            return
        self.counters.received += 1
        if qos == 0 and self.full:
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
        self._held.append(_Held(incoming, self.generation if qos > 0 else None))
        self.counters.held_incoming = len(self._held)

    def deliver(self, client: paho.Client) -> None:
        """Offer held messages in arrival order; stop at the first one that finds no room."""
        while self._held:
            held = self._held[0]
            if held.generation is not None and held.generation != self.generation:
                return  # came on a lost connection: the next CONNACK decides (sort)
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
                ledger = self.ledger
                if ledger is None or not ledger.keep(held.message.mid, held.generation):
                    client.ack(held.message.mid, held.message.qos)

    def sort(self, session_present: bool) -> None:
        """Resolve QoS 1 messages held from a lost connection once the new CONNACK is in."""
        kept: deque[_Held] = deque()
        for held in self._held:
            if held.generation is None or held.generation == self.generation:
                kept.append(held)
            elif not session_present:
                # The broker lost the session: these are the only copies; deliver, never ack.
                kept.append(_Held(held.message, None))
            # else: the broker re-sends unacknowledged messages of the resumed session itself.
        self._held = kept
        self.counters.held_incoming = len(kept)
