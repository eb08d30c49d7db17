"""Publish simulated machines to MQTT: `oteo simulate --broker URL --streams N --rate HZ ...`.

Each stream `sim-{i}` is one run of the same pump build (so one model serves them all). Every
reading advances the simulated clock by one sample period; `--rate` sets how many readings per
second of wall time each stream publishes, so a rate above 1/period fast-forwards the machine.
Fault start and duration are in seconds of the run (wall time), like `--duration`.

paho is used from this one thread only (publish and loop in turn): QoS 1 publishes from a
thread other than paho's network thread stall here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt

from training.fault import FaultSpec, inject
from training.simulator import CHANNELS, MachineSimulator, reference_scales

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishPlan:
    url: str
    streams: int
    rate_hz: float
    duration_s: float
    period_s: float = 1.0
    seed: int = 1
    prefix: str = "sensors"
    qos: int = 1
    faults: tuple[FaultSpec, ...] = ()


def stream_series(plan: PublishPlan, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The stream's readings [T, C] with its faults injected, and the anomaly mask [T]."""
    rows = max(1, round(plan.duration_s * plan.rate_hz))
    values = MachineSimulator(plan.seed + index, plan.period_s).step(rows)
    # Fault sizes come from hours of the same machine, not from this (possibly short) run.
    scales = reference_scales(0, plan.period_s)
    anomaly = np.zeros(rows, dtype=bool)
    rng = np.random.default_rng([plan.seed, index, 0xFA017])
    name = f"sim-{index}"
    for spec in plan.faults:
        if spec.stream not in (None, name):
            continue
        start = round(
            (spec.start_s if spec.start_s is not None else plan.duration_s / 2) * plan.rate_hz
        )
        length = round((spec.duration_s if spec.duration_s is not None else 30.0) * plan.rate_hz)
        values, mask = inject(values, spec.kind, start, max(1, length), rng, scales=scales)
        anomaly |= mask
    return values, anomaly


def connect(url: str, client_id: str = "") -> mqtt.Client:
    """A connected paho client (MQTT v5) for publishing from the calling thread."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:1883, not {url!r}")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    if parts.scheme == "mqtts":
        client.tls_set()
    if parts.username:
        client.username_pw_set(parts.username, parts.password)
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    client.connect(parts.hostname, port, keepalive=30)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        client.loop(timeout=0.1)
        if time.monotonic() > deadline:
            raise ConnectionError(f"no CONNACK from {parts.hostname}:{port} within 10 s")
    return client


def publish(plan: PublishPlan, start_ts: float | None = None) -> dict[str, int]:
    """Publish every stream's readings at the planned rate; returns counts."""
    series = [stream_series(plan, i) for i in range(plan.streams)]
    client = connect(plan.url)
    acked = 0

    def on_publish(
        client: mqtt.Client, userdata: object, mid: int, rc: object, props: object
    ) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    t0_data = start_ts if start_ts is not None else time.time()
    rows = len(series[0][0])
    sent = 0
    t_start = time.monotonic()
    for row in range(rows):
        ts = t0_data + row * plan.period_s
        for i, (values, _) in enumerate(series):
            payload = {
                "ts": ts,
                "seq": row,
                "values": dict(zip(CHANNELS, values[row].round(5).tolist(), strict=True)),
            }
            client.publish(f"{plan.prefix}/sim-{i}/data", json.dumps(payload), qos=plan.qos)
            sent += 1
            client.loop(timeout=0.0)
        due = t_start + (row + 1) / plan.rate_hz
        while (wait := due - time.monotonic()) > 0:
            client.loop(timeout=min(wait, 0.05))
    deadline = time.monotonic() + 10
    while plan.qos > 0 and acked < sent and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    client.loop(timeout=0.1)
    return {
        "sent": sent,
        "acked": acked if plan.qos > 0 else sent,
        "anomalous": int(sum(a.sum() for _, a in series)),
    }
