"""What the daemon says about itself: gauges mirrored from other threads, and a periodic log line.

The MQTT link and the outbox belong to the network thread and keep plain counters; the main loop
advances the Prometheus metrics to them once a second (`LinkMirror`). `Summary` logs one INFO
line every few minutes: streams by state, readings per second, active alarms, drops by reason.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon.metrics import Metrics
from daemon.mqtt import LinkCounters
from daemon.outbox import Outbox

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 300.0


class LinkMirror:
    """Advances Prometheus counters to running totals kept by the network thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._mirrored: dict[str, int] = {}

    def update(self, counters: LinkCounters, outbox: Outbox, incomplete: int) -> None:
        m = self.metrics
        # The outbox belongs to the network thread; its size and byte count are cached ints.
        m.outbox_events.set(len(outbox))
        m.outbox_bytes.set(outbox.bytes)
        self._mirror(m.outbox_dropped_total, "outbox_dropped", outbox.dropped)
        self._mirror(m.outbox_errors_total, "outbox_errors", counters.outbox_errors)
        self._mirror(m.mqtt_publish_acks_total, "acked", counters.acked)
        self._mirror(m.mqtt_reconnects_total, "reconnects", counters.reconnects)
        unsent = m.mqtt_publish_dropped_total
        self._mirror(unsent.labels(reason="not_connected"), "nc", counters.dropped_not_connected)
        self._mirror(unsent.labels(reason="queue_full"), "full", counters.dropped_queue_full)
        # Dropped inside the link, before the intake saw them: counted like the intake's own.
        qos0_full = m.messages_total.labels(result="queue_full_qos0")
        self._mirror(qos0_full, "link_qos0", counters.dropped_qos0)
        bad_topic = m.messages_total.labels(result="unknown_stream_topic")
        self._mirror(bad_topic, "link_bad_topics", counters.bad_topics)
        for kind, count in list(counters.connect_failures.items()):
            self._mirror(m.mqtt_connect_failures_total.labels(reason=kind), f"cf_{kind}", count)
        self._mirror(m.aligner_incomplete_total, "incomplete", incomplete)

    def _mirror(self, counter: Any, key: str, total: int) -> None:
        last = self._mirrored.get(key, 0)
        if total > last:
            counter.inc(total - last)
        self._mirrored[key] = total


class Summary:
    """One INFO line every `every_s` about the last interval (monotonic time)."""

    def __init__(self, metrics: Metrics, now: float, every_s: float = SUMMARY_EVERY_S) -> None:
        self.metrics = metrics
        self.every_s = every_s
        self._next = now + every_s
        self._since = now
        self._last = self._totals()

    def maybe_log(self, now: float) -> None:
        if now < self._next:
            return
        totals = self._totals()
        seconds = max(now - self._since, 1e-9)
        delta = {k: v - self._last.get(k, 0.0) for k, v in totals.items()}
        readings = delta.pop("readings")
        drops = {k: v for k, v in delta.items() if k != "ok" and v > 0}
        log.info(
            "last %.0f s: %s; %.1f readings/s; %d alarms active; dropped: %s",
            seconds,
            self._streams(),
            readings / seconds,
            int(self._value("oteo_alarms_active") or 0),
            ", ".join(f"{k} {v:.0f}" for k, v in sorted(drops.items())) or "none",
        )
        self._last, self._since, self._next = totals, now, now + self.every_s

    def _totals(self) -> dict[str, float]:
        out = {"readings": self._value("oteo_readings_total") or 0.0}
        for family in self.metrics.messages_total.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["result"]] = sample.value
        return out

    def _streams(self) -> str:
        counts = []
        for family in self.metrics.streams.collect():
            counts += [(s.labels["state"], int(s.value)) for s in family.samples if s.value]
        total = sum(n for _, n in counts)
        detail = ", ".join(f"{n} {state}" for state, n in counts)
        return f"{total} streams" + (f" ({detail})" if detail else "")

    def _value(self, name: str) -> float | None:
        value: float | None = self.metrics.registry.get_sample_value(name)
        return value
