"""`oteo replay`: publish a CSV's rows as readings, to try the daemon on your own data.

Each row becomes the documented reading, `{"ts": ..., "seq": ..., "values": {channel: number}}`
on `{prefix}/{stream}/data` at QoS 1. Timestamps are the CSV's own (`daemon.series`) or, with
`now`, this host's clock at the start plus one sample period per reading; a loop shifts each
pass by the CSV's span, so time keeps moving forward. `seq` counts readings from 0.

paho is driven from the calling thread only (publish, then run its loop): QoS 1 publishes from
a thread other than paho's network thread stall in paho 2.2.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.section import MqttSection
from daemon.series import Series

MAX_INFLIGHT = 100
CONNECT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 30.0  # no PUBACK for this long: the broker is gone


@dataclass(frozen=True)
class ReplayPlan:
    """Where and how fast to publish; `rate_hz` None is the series' own pace (1 / period)."""

    broker: MqttSection
    stream: str
    rate_hz: float | None = None
    loop: bool = False
    now: bool = False
    prefix: str = "sensors"

    @property
    def topic(self) -> str:
        return f"{self.prefix}/{self.stream}/data"


@dataclass
class ReplayCount:
    """Readings published and acknowledged, and complete passes over the series."""

    published: int = 0
    acknowledged: int = 0
    passes: int = 0


def connect(
    broker: MqttSection, client_id: str = "", stop: threading.Event | None = None
) -> paho.Client:
    """A connected MQTT v5 client, driven by the caller's thread; raise ConnectionError."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(MAX_INFLIGHT)
    if broker.tls:
        client.tls_set(ca_certs=str(broker.ca_file) if broker.ca_file else None)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password())
    refused: list[str] = []

    def on_connect(_c: paho.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            refused.append(str(reason))

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive_s)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {broker.url}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not client.is_connected():
        if stop is not None and stop.is_set():
            raise ConnectionError(f"stopped while connecting to {broker.url}")
        if refused:
            raise ConnectionError(f"{broker.url} refused the connection: {refused[0]}")
        if time.monotonic() > deadline:
            raise ConnectionError(f"no CONNACK from {broker.url} within {CONNECT_TIMEOUT_S:g} s")
        _pump(client, 0.05, broker.url)
    return client


def replay(series: Series, plan: ReplayPlan, stop: threading.Event | None = None) -> ReplayCount:
    """Publish the series (again and again with `plan.loop`) until done or `stop` is set."""
    return _Replayer(series, plan, stop or threading.Event()).run()


class _Replayer:
    """One replay: the client, the pace and the counts (all used from the calling thread)."""

    def __init__(self, series: Series, plan: ReplayPlan, stop: threading.Event) -> None:
        self.series = series
        self.plan = plan
        self.stop = stop
        self.count = ReplayCount()
        self.unacked: set[int] = set()
        self.rate_hz = plan.rate_hz or 1.0 / series.period_s
        self.client = connect(plan.broker, stop=stop)
        self.client.on_publish = self._on_publish
        self.origin = time.time()  # of now-based timestamps
        self.t_start = time.monotonic()

    def run(self) -> ReplayCount:
        try:
            while not self.stop.is_set():
                for row in range(len(self.series.values)):
                    self._wait(self.t_start + self.count.published / self.rate_hz)
                    if self.stop.is_set():
                        break
                    self._publish(row)
                else:
                    self.count.passes += 1
                if not self.plan.loop:
                    break
            self._settle()
        finally:
            self.client.disconnect()
        return self.count

    def _publish(self, row: int) -> None:
        rec, count = self.series, self.count
        if self.plan.now or rec.timestamps is None:
            ts = self.origin + count.published * rec.period_s
        else:  # each pass of a loop later by the series' span: time keeps moving forward
            ts = float(rec.timestamps[row]) + count.passes * rec.span_s
        values = dict(zip(rec.channels, rec.values[row].tolist(), strict=True))
        payload = json.dumps({"ts": round(ts, 6), "seq": count.published, "values": values})
        info = self.client.publish(self.plan.topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.plan.broker.url}: {paho.error_string(info.rc)}")
        self.unacked.add(info.mid)
        count.published += 1
        _pump(self.client, 0.0, self.plan.broker.url)

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, _r: object, _p: object) -> None:
        self.unacked.discard(mid)
        self.count.acknowledged += 1

    def _wait(self, due: float) -> None:
        """Run paho's loop until the next reading is due and there is room in flight."""
        stalled_since = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            room = len(self.unacked) < MAX_INFLIGHT
            if room and now >= due:
                return
            if room:
                stalled_since = now
            elif now - stalled_since > STALL_TIMEOUT_S:
                raise ConnectionError(
                    f"{self.plan.broker.url} acknowledged nothing for {STALL_TIMEOUT_S:g} s"
                )
            _pump(self.client, min(max(due - now, 0.001), 0.05), self.plan.broker.url)

    def _settle(self) -> None:
        """Wait (bounded) for the acknowledgements of what was published."""
        deadline = time.monotonic() + STALL_TIMEOUT_S
        while self.unacked and time.monotonic() < deadline:
            _pump(self.client, 0.05, self.plan.broker.url)


def _pump(client: paho.Client, timeout_s: float, url: str) -> None:
    rc = client.loop(timeout=timeout_s)
    if rc != paho.MQTT_ERR_SUCCESS:
        raise ConnectionError(f"lost the connection to {url}: {paho.error_string(rc)}")
