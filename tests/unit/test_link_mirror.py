"""LinkMirror: the network thread's running totals reach Prometheus counters, each once."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.metrics import Metrics
from daemon.mqtt.message import LinkCounters
from daemon.telemetry import LinkMirror


@dataclass
class Outbox:  # the three things LinkMirror reads of daemon.outbox.Outbox
    events: int = 0
    bytes: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return self.events


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


def test_messages_not_published_are_counted_by_reason_once_each() -> None:
    metrics, counters, outbox = Metrics(), LinkCounters(), Outbox()
    mirror = LinkMirror(metrics)
    mirror.update(counters, outbox, 0)  # type: ignore[arg-type]
    dropped = "oteo_mqtt_publish_dropped_total"
    assert sample(metrics, dropped, reason="not_connected") == 0
    counters.dropped_not_connected = 7  # window scores while the broker was away
    counters.dropped_queue_full = 2
    mirror.update(counters, outbox, 0)  # type: ignore[arg-type]
    mirror.update(counters, outbox, 0)  # type: ignore[arg-type]  (nothing new: no double count)
    assert sample(metrics, dropped, reason="not_connected") == 7
    assert sample(metrics, dropped, reason="queue_full") == 2
    counters.dropped_not_connected = 10
    mirror.update(counters, outbox, 0)  # type: ignore[arg-type]
    assert sample(metrics, dropped, reason="not_connected") == 10
