"""Load generator processes for `oteo benchmark throughput`: a fast QoS 1 publisher and a bare
paho subscriber (the transport limit). Run as `python -m training.bench.loadgen publish|receive`;
each prints one JSON line with what it did.

The publisher pre-encodes every payload before it sends the first one, and uses paho from its
one thread (publish and loop in turn: QoS 1 publishes from another thread stall here).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import click
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

INFLIGHT = 1000  # unacknowledged QoS 1 messages per publisher: enough to keep the socket full
LOOP_EVERY = 100  # publishes between two reads of PUBACKs
# Faulty streams: 80 normal readings, then 40 anomalous ones. The alarm of the demo model ends
# ~35 windows after the fault (its windows are 32 long) and cools down for 32 more: < 80.
FAULT_CYCLE = 120
FAULT_START = 80


def encode_payloads(
    series: np.ndarray,
    first_stream: int,
    streams: int,
    per_stream: int,
    batch: int,
    start: int,
    base_ts: int,
    prefix: str = "sensors",
    fault_every: int = 0,
) -> list[tuple[str, bytes]]:
    """Reading messages, round-robin over the streams; message k of a stream carries readings
    start + k*batch .. start + k*batch + batch - 1 (ts = base_ts + reading, seq = reading).

    With `fault_every` N, every N-th stream reads 1.5x its values in the last FAULT_RUN of
    every FAULT_CYCLE readings: alarms start and end, so events are published.
    """
    rows = [",".join(f"{v:.5g}" for v in row) for row in series]
    faulty = [",".join(f"{1.5 * v:.5g}" for v in row) for row in series]
    out: list[tuple[str, bytes]] = []
    for k in range(per_stream):
        for s in range(first_stream, first_stream + streams):
            parts = []
            for r in range(start + k * batch, start + (k + 1) * batch):
                # Each stream reads the series from its own offset: 100 different machines.
                anomalous = fault_every and s % fault_every == 0 and r % FAULT_CYCLE >= FAULT_START
                row = (faulty if anomalous else rows)[(r + 37 * s) % len(rows)]
                parts.append(f'{{"ts":{base_ts + r},"seq":{r},"values":[{row}]}}')
            body = parts[0] if batch == 1 else "[" + ",".join(parts) + "]"
            out.append((f"{prefix}/s{s}/data", body.encode()))
    return out


def _client(client_id: str, clean: bool, v311: bool = False) -> paho.Client:
    """An MQTT 5 client, or 3.1.1 (`v311`: nats-server's MQTT listener speaks only 3.1.1)."""
    if v311:
        return paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean,
            reconnect_on_failure=False,
        )
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )


def _connect(client: paho.Client, port: int, clean: bool, receive_max: int | None = None) -> None:
    connected: list[bool] = []
    client.on_connect = lambda c, u, f, reason, p: connected.append(not reason.is_failure)
    if client.protocol == MQTTProtocolVersion.MQTTv311:
        client.connect("127.0.0.1", port, 60)  # clean_session was given to the client
    else:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3600
        if receive_max is not None:
            props.ReceiveMaximum = receive_max
        client.connect("127.0.0.1", port, 60, clean_start=clean, properties=props)
    # 30 s, retrying a refusal or a dropped connection: right after a nats-server node died the
    # others answer a CONNECT only once the session stream has a new leader.
    deadline = time.monotonic() + 30
    while not (connected and connected[-1]) and time.monotonic() < deadline:
        client.loop(0.05)
        if (connected and not connected[-1]) or (not client.is_connected() and connected):
            connected.clear()
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                client.reconnect()
    if not connected or not connected[-1]:
        raise SystemExit(f"cannot connect to 127.0.0.1:{port}")


STALL_S = 5.0  # no PUBACK for this long with publications pending: reconnect and re-send


def subscribe_ready(client: paho.Client, subscriptions: list[tuple[str, int]]) -> None:
    """Subscribe, wait for the broker's SUBACK, then tell the parent process: {"ready": true}."""
    subscribed: list[bool] = []
    client.on_subscribe = lambda *a: subscribed.append(True)
    client.subscribe(subscriptions)
    while not subscribed:
        client.loop(0.05)
    print(json.dumps({"ready": True}), flush=True)


def _reconnect(client: paho.Client, persistent: bool, stalled: bool = False) -> int:
    """1 if a persistent-session client's connection was opened again (paho re-sends the
    unacknowledged QoS 1 messages then), else 0: when it was lost, or when PUBACKs stopped
    coming (a nats-server node whose stream is electing a leader times the store out and
    never acknowledges, while the connection stays up)."""
    if not persistent or (client.is_connected() and not stalled):
        return 0
    try:
        client.reconnect()
    except OSError:
        time.sleep(0.2)
        return 0
    # Until the CONNACK: is_connected() stays False before it, and another reconnect then
    # would drop this connection again.
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.05)
    return 1


@click.group()
def main() -> None:
    """Load generator processes (internal to `oteo benchmark throughput`)."""


@main.command()
@click.option("--port", type=int, required=True)
@click.option("--series", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--first-stream", type=int, default=0)
@click.option("--streams", type=int, default=100)
@click.option("--per-stream", type=int, required=True, help="Messages per stream.")
@click.option("--batch", type=int, default=1, help="Readings per message.")
@click.option("--start", type=int, default=0, help="First reading number (ts and seq).")
@click.option("--base-ts", type=int, required=True)
@click.option("--rate", type=float, default=0.0, help="Messages/s; 0: as fast as possible.")
@click.option("--prefix", default="sensors", help="Topics are PREFIX/s{i}/data.")
@click.option("--fault-every", type=int, default=0, help="Every N-th stream has faults.")
@click.option("--times", type=click.Path(path_type=Path), help="Write publish times (.npy).")
@click.option("--v311", is_flag=True, help="MQTT 3.1.1 (nats-server), not MQTT 5.")
def publish(
    port: int,
    series: Path,
    first_stream: int,
    streams: int,
    per_stream: int,
    batch: int,
    start: int,
    base_ts: int,
    rate: float,
    prefix: str,
    fault_every: int,
    times: Path | None,
    v311: bool,
) -> None:
    """Publish every message at QoS 1 and wait until the broker acknowledged all of them."""
    values = np.load(series)
    messages = encode_payloads(
        values, first_stream, streams, per_stream, batch, start, base_ts, prefix, fault_every
    )
    acked = 0

    last_ack = time.monotonic()

    def on_publish(c: paho.Client, u: object, mid: int, reason: object, props: object) -> None:
        nonlocal acked, last_ack
        acked += 1
        last_ack = time.monotonic()

    def stalled(sent: int) -> bool:
        nonlocal last_ack
        if acked < sent and time.monotonic() - last_ack > STALL_S:
            last_ack = time.monotonic()  # one reconnect per stall period
            return True
        return False

    # On 3.1.1 (NATS) a persistent session: a cluster node may drop the connection while its
    # stream elects a leader; paho then re-sends what was not acknowledged after reconnecting.
    client = _client(f"bench-pub-{first_stream}-{time.monotonic_ns()}", not v311, v311)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    _connect(client, port, clean=True)
    sent_at = np.zeros(len(messages)) if times is not None else None
    reconnects = 0
    t0 = time.time()
    t_start = time.perf_counter()
    for i, (topic, payload) in enumerate(messages):
        if rate > 0:
            wait_s = t_start + i / rate - time.perf_counter()
            if wait_s > 0:  # sleep, not spin: the broker and the daemon need the cores
                client.loop(0)
                time.sleep(wait_s)
        if sent_at is not None:
            sent_at[i] = time.time()
        client.publish(topic, payload, qos=1)
        if i % LOOP_EVERY == 0:
            client.loop(0)
            reconnects += _reconnect(client, v311, stalled(i + 1))
    t_sent = time.time()
    deadline = time.monotonic() + 120
    while acked < len(messages) and time.monotonic() < deadline:
        client.loop(0.01)
        reconnects += _reconnect(client, v311, stalled(len(messages)))
    t_acked = time.time()
    client.disconnect()
    if times is not None and sent_at is not None:
        np.save(times, sent_at)
    doc = {"sent": len(messages), "acked": acked, "t0": t0, "t_sent": t_sent, "t_acked": t_acked}
    print(json.dumps({**doc, "reconnects": reconnects}), flush=True)


@main.command()
@click.option("--port", type=int, required=True)
@click.option("--client-id", required=True)
@click.option("--topic", default="sensors/+/data")
@click.option("--expect", type=int, default=0, help="Stop after this many messages.")
@click.option("--receive-max", type=int, default=100)
@click.option("--subscribe-only", is_flag=True, help="Create the session, subscribe, leave.")
@click.option("--idle-s", type=float, default=10.0, help="Give up after this long with nothing.")
def receive(
    port: int,
    client_id: str,
    topic: str,
    expect: int,
    receive_max: int,
    subscribe_only: bool,
    idle_s: float,
) -> None:
    """A subscriber that does nothing but count (paho acknowledges QoS 1 after each message)."""
    client = _client(client_id, False)
    count = 0
    first = last = 0.0

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        nonlocal count, first, last
        last = time.time()
        if not count:
            first = last
        count += 1

    client.on_message = on_message
    t0 = time.time()
    _connect(client, port, clean=False, receive_max=receive_max)
    t_connected = time.time()
    subscribed: list[bool] = []
    client.on_subscribe = lambda *a: subscribed.append(True)
    client.subscribe(topic, qos=1)
    while not subscribed:
        client.loop(0.05)
    if subscribe_only:
        client.disconnect()
    else:
        while count < expect and time.time() - max(last, t_connected) < idle_s:
            client.loop(0.05)
        # Done: end the session, or the broker would keep queueing for it.
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        client.disconnect(properties=props)
    doc = {"received": count, "t0": t0, "t_connected": t_connected, "first": first, "last": last}
    print(json.dumps(doc), flush=True)


@main.command()
@click.option("--port", type=int, required=True)
@click.option("--topic", "topics", multiple=True, required=True)
@click.option("--seconds", type=float, required=True, help="Listen this long after the first.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--readings",
    is_flag=True,
    help="The messages are readings (PREFIX/stream/data, numeric ts), not events; QoS 1 with "
    "Receive Maximum 100, as the daemon subscribes.",
)
def scores(port: int, topics: tuple[str, ...], seconds: float, out: Path, readings: bool) -> None:
    """Record (stream, window ts, arrival time) of every event (or score) on `topics`."""
    client = _client(f"bench-scores-{time.monotonic_ns()}", True)
    rows: list[tuple[str, float, float]] = []

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        arrived = time.time()
        doc = json.loads(msg.payload)
        if readings:
            rows.append((msg.topic.split("/")[1], float(doc["ts"]), arrived))
        else:
            ts = datetime.fromisoformat(doc["ts"].replace("Z", "+00:00")).timestamp()
            rows.append((doc["stream"], ts, arrived))

    client.on_message = on_message
    _connect(client, port, clean=True, receive_max=100 if readings else None)
    subscribe_ready(client, [(t, 1 if readings else 0) for t in topics])
    deadline = time.time() + 30 + seconds
    while time.time() < (rows[0][2] + seconds if rows else deadline):
        client.loop(0.05)
    client.disconnect()
    out.write_text(json.dumps(rows))
    print(json.dumps({"received": len(rows)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
