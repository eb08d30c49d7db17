"""The paho client, configured once: protocol, session, TLS, credentials, last will."""

from __future__ import annotations

import logging

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import ConfigError, MqttSection

# A blackholed broker blocks the network thread this long per attempt (TCP connect, TLS
# handshake); publish() callers are not blocked, their messages wait in the queue.
CONNECT_TIMEOUT_S = 3.0


def make_client(
    cfg: MqttSection,
    client_id: str,
    *,
    status_topic: str,
    offline_payload: bytes,
    max_queued: int,
) -> paho.Client:
    """A paho client for `cfg` with manual acks and the offline status as last will.

    Raises ConfigError when the TLS files cannot be used.
    """
    if cfg.protocol == "5":
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
    paho_log = logging.getLogger(f"{__package__}.paho")
    if paho_log.isEnabledFor(logging.DEBUG):
        # Packet traces on demand only: otherwise paho logs each lost socket at ERROR,
        # beside our own rate-limited line.
        client.enable_logger(paho_log)
    client.suppress_exceptions = True  # a callback bug must not corrupt paho's packet state
    client.connect_timeout = CONNECT_TIMEOUT_S
    client.max_inflight_messages_set(cfg.max_inflight)
    client.max_queued_messages_set(max_queued)
    client.will_set(status_topic, offline_payload, qos=1, retain=True)
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
    return client


def set_connect_parameters(client: paho.Client, cfg: MqttSection) -> None:
    """Where and how `reconnect()` connects: a persistent session on every connect."""
    if cfg.protocol != "5":
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
        return
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = cfg.session_expiry_s
    # The broker never has more unacknowledged QoS 1 messages in flight to us than we hold.
    props.ReceiveMaximum = min(cfg.max_inflight, 65535)
    # clean_start=False on every connect: paho's default sends Clean Start = 1 on the first
    # connect of a process, and the broker would discard the backlog kept for us.
    client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props)


def _text(path: object) -> str | None:
    return None if path is None else str(path)
