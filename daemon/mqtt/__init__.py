"""The MQTT link: one broker connection driven by one network thread (see `link`).

`link` owns the thread and the connection; `inbox` holds received messages until the daemon takes
them (then they are acknowledged); `sender` queues outgoing ones through the on-disk outbox;
`shutdown` stops cleanly; `client` configures paho; `message` defines what crosses the boundary.
"""

from daemon.mqtt.link import MqttLink
from daemon.mqtt.message import (
    CONNECT_FAILURE_KINDS,
    Incoming,
    LinkCounters,
    LinkState,
    OutboxEntry,
    OutboxLike,
    Outgoing,
)

__all__ = [
    "CONNECT_FAILURE_KINDS",
    "Incoming",
    "LinkCounters",
    "LinkState",
    "MqttLink",
    "OutboxEntry",
    "OutboxLike",
    "Outgoing",
]
