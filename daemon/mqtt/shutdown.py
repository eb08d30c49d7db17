"""A clean stop of the link: flush, publish offline, disconnect — each phase bounded in time."""

from __future__ import annotations

import paho.mqtt.client as paho

from daemon.mqtt.message import Outgoing
from daemon.mqtt.sender import Sender


class Shutdown:
    """flush -> offline -> closing -> finished; `advance` is called by the network thread."""

    def __init__(self, started: float, timeout_s: float) -> None:
        self.started = started
        self.deadline = started + timeout_s
        self.phase = "flush"
        self.finished = False
        self.result = False  # everything acknowledged
        self._offline_mid: int | None = None

    def advance(
        self, now: float, connected: bool, client: paho.Client, sender: Sender, offline: Outgoing
    ) -> None:
        budget = self.deadline - self.started
        if self.phase == "flush":
            flushed = not sender.queued and (
                not connected or (sender.outbox_drained and not sender.unacked)
            )
            if not (flushed or now >= self.started + 0.7 * budget):
                return
            if connected:
                self._offline_mid = sender.send(offline, None)
            self.phase = "offline"
        if self.phase == "offline":
            waiting = connected and self._offline_mid in sender.unacked
            if waiting and now < self.started + 0.9 * budget:
                return
            # The offline status is unacknowledged until its PUBACK, so it counts here too.
            self.result = not sender.queued and not sender.unacked and sender.outbox_empty()
            if connected:
                client.disconnect()  # DISCONNECT: the broker discards the last will
            self.phase = "closing"
        if self.phase == "closing":
            if client.socket() is not None and now < self.deadline:
                return  # DISCONNECT still waiting for the socket to take it
            self.finished = True
