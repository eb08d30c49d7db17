"""The connection's life: connect, reconnect with back-off, and what the broker says about it.

Runs in the link's network thread only: `connect` starts an attempt, and paho's callbacks for
CONNACK, SUBACK and the loss of the connection (called inside loop_read / loop_misc) move the
state. A refused CONNACK never marks the link connected; every failure is counted by kind and
logged (rate-limited by the back-off), every connect logged at INFO.
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import MqttSection
from daemon.mqtt.backoff import Backoff
from daemon.mqtt.inbox import Inbox
from daemon.mqtt.message import LinkCounters, LinkState, Outgoing
from daemon.mqtt.sender import Sender
from daemon.throttle import Throttle

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

_REFUSALS = {  # CONNACK reason code -> kind
    0x86: "bad_credentials",  # bad user name or password (v3.1.1 return code 4 maps here)
    0x8C: "bad_credentials",  # bad authentication method
    0x87: "not_authorized",  # (v3.1.1 return code 5)
    0x88: "server_unavailable",  # (v3.1.1 return code 3)
    0x89: "server_unavailable",  # server busy
}

_callback_bug_log = Throttle()


def guarded(callback: Callable[_P, None]) -> Callable[_P, None]:
    """paho calls these in the middle of a packet: no exception may escape into paho."""

    @functools.wraps(callback)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            if _callback_bug_log.ready():
                log.exception("MQTT %s failed", callback.__name__)

    return wrapper


class Connection:
    """State of the broker connection and the handlers that change it."""

    def __init__(
        self,
        cfg: MqttSection,
        client: paho.Client,
        *,
        counters: LinkCounters,
        inbox: Inbox,
        sender: Sender,
        subscriptions: Sequence[tuple[str, int]],
        online: Callable[[], Outgoing],
        on_state: Callable[[LinkState, str], None] | None,
        stopping: threading.Event,
        client_id: str = "",
    ) -> None:
        self._cfg = cfg
        self._client_id = client_id  # in log lines: a daemon with partitions has many sessions
        self._client = client
        self.counters = counters
        self._inbox = inbox
        self._sender = sender
        self._subscriptions = list(subscriptions)
        self._online = online
        self._on_state = on_state
        self._stopping = stopping
        self.connected = threading.Event()  # read by other threads
        self.state = LinkState.DISCONNECTED
        self.next_attempt = 0.0
        self._error = ""  # paho's last error while CONNECTING (it reports none else)
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._ever_connected = False
        self._subscribe_failure_logged = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe

    @property
    def up(self) -> bool:
        return self.state is LinkState.CONNECTED

    def connect(self) -> None:
        """Start a connection attempt; the callbacks say how it went."""
        cfg = self._cfg
        self.set_state(LinkState.CONNECTING, f"connecting to {cfg.host}:{cfg.port}")
        # paho says why a connection closed before CONNACK only in its log (e.g. a TLS 1.3
        # server rejecting our client certificate after the handshake); listen while connecting
        # only, as formatting every packet's log line would cost on the hot path.
        self._error = ""
        self._client.on_log = self._on_paho_log
        try:
            rc = self._client.reconnect()
        except ssl.SSLError as exc:  # also certificate verification failures
            self._failed("tls", f"TLS: {exc}")
        except OSError as exc:
            self._failed("network", exc.strerror or str(exc) or type(exc).__name__)
        except Exception as exc:
            self._failed("network", f"{type(exc).__name__}: {exc}")
        else:
            if self._client.socket() is None and self.state is LinkState.CONNECTING:
                self._failed("network", paho.error_string(rc))
        # Otherwise CONNECT is on its way; _on_connect or _on_disconnect says how it went. A
        # broker that never answers is dropped by paho's keep-alive check in loop_misc().

    def set_state(self, state: LinkState, reason: str) -> None:
        if state is self.state:
            return
        self.state = state
        if state is LinkState.CONNECTED:
            self.connected.set()
        else:
            self.connected.clear()
        if self._on_state is not None:
            try:
                self._on_state(state, reason)
            except Exception:
                log.exception("on_state callback failed")

    def _failed(self, kind: str, detail: str) -> None:
        self.counters.connect_failures[kind] += 1
        self._retry_later(f"cannot connect to MQTT broker {self._where()}: {detail}")

    def _retry_later(self, reason: str) -> None:
        now = time.monotonic()
        delay_s, worth_logging = self._backoff.failure(reason, now)
        self.next_attempt = now + delay_s
        if worth_logging:
            log.warning(
                "%s; retrying in %.1f s (%d failures in a row)",
                reason,
                delay_s,
                self._backoff.failures,
            )
        self.set_state(LinkState.DISCONNECTED, reason)

    def _where(self) -> str:
        who = f" as {self._client_id}" if self._client_id else ""
        return f"{self._cfg.host}:{self._cfg.port}{who}"

    # -- paho callbacks ----------------------------------------------------------------------

    @guarded
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
            self._failed(kind, f"broker refused the connection: {reason}")
            return
        failures = self._backoff.failures
        self._backoff.reset()
        self.counters.connects += 1
        if self._ever_connected:
            self.counters.reconnects += 1
        self._ever_connected = True
        self._inbox.sort(flags.session_present)
        limit = self._cfg.max_inflight
        if props is not None and hasattr(props, "ReceiveMaximum"):
            # The broker's own cap; paho's window cannot change on an open connection, but the
            # durable (outbox) window can.
            limit = min(limit, int(props.ReceiveMaximum))
        self._sender.inflight_limit = limit
        self._subscribe_failure_logged = False
        if self._subscriptions:
            client.subscribe(self._subscriptions)
        self._sender.send(self._online(), None)
        after = f" after {failures} failed attempts" if failures else ""
        text = f"connected to {self._where()}{after} (session present: {flags.session_present})"
        log.info("MQTT %s", text)
        self.set_state(LinkState.CONNECTED, text)

    @guarded
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

    @guarded
    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self.state is LinkState.CONNECTED:
            self._inbox.generation += 1
            self._sender.connection_lost()
            if self._stopping.is_set():
                self.set_state(LinkState.DISCONNECTED, "disconnected")
                return
            self.counters.disconnects += 1
            who = "broker closed" if flags.is_disconnect_packet_from_server else "lost"
            self._retry_later(f"MQTT connection to {self._where()} {who}: {reason}")
        elif self.state is LinkState.CONNECTING:
            client.on_log = None
            detail = f"connection closed before CONNACK: {self._error or reason}"
            if not self._cfg.tls:
                self._failed("network", detail)
                return
            # Over TLS this is how a broker refuses our certificate (or its absence): TLS 1.3
            # finishes the client's side of the handshake first, then the server closes, with
            # an alert or without one depending on timing.
            if self._cfg.cert_file is None:
                detail = f"the broker may require a client certificate (mqtt.cert_file); {detail}"
            self._failed("tls", f"TLS: {detail}")

    def _on_paho_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._error = buf
