"""The 3-node NATS cluster harness: the mapping spreads streams over partitions, and sessions
survive the loss of a node.

16 paho consumers (MQTT 3.1.1, clean_session=False, QoS 1), one per partition, subscribe to
`part/<k>/sensors/+/data` spread over the three nodes; a publisher on one node sends readings of
200 stream ids on `sensors/<id>/data`. Every message arrives on exactly one partition, each id
always on the same one, nothing lost, nothing duplicated. Then one node is killed (-9): the
consumers that were on it reconnect to another node with the same client ids, publishing
continues, and still nothing is lost.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from daemon_harness import wait_until
from nats_cluster import NatsCluster, running_cluster
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.partition import partition_of

PARTITIONS = 16
STREAMS = 200
ACK_WAIT_S = 3.0


class Consumer:
    """One partition's persistent session: records (partition, stream, n) of what it gets."""

    def __init__(self, partition: int, port: int, log: list[tuple[int, str, int]]) -> None:
        self.partition = partition
        self.port = port
        self.log = log
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = self._connect(port)

    def _connect(self, port: int) -> paho.Client:
        self.port = port
        self.subscribed.clear()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"oteo-test-part-{self.partition}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(f"part/{self.partition}/sensors/+/data", qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        stream = message.topic.split("/")[3]
        n = json.loads(message.payload)["n"]
        with self.lock:
            self.log.append((self.partition, stream, n))

    def move_to(self, port: int) -> None:
        """Reconnect with the same client id to another node (its node died)."""
        self.client.loop_stop()
        self.client = self._connect(port)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, rounds: range) -> int:
    """QoS 1 readings of every stream for each round; returns how many the broker acknowledged."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="test-publisher",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        infos = [
            client.publish(f"sensors/s{i:03d}/data", json.dumps({"n": n}), qos=1)
            for n in rounds
            for i in range(STREAMS)
        ]
        for info in infos:
            info.wait_for_publish(timeout=20)
            assert info.is_published(), "the broker did not acknowledge a reading"
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    with running_cluster(tmp_path / "nats", partitions=PARTITIONS, ack_wait_s=ACK_WAIT_S) as c:
        yield c


def test_streams_stay_on_one_partition_and_survive_a_node_kill(cluster: NatsCluster) -> None:
    log: list[tuple[int, str, int]] = []
    ports = cluster.mqtt_ports
    consumers = [Consumer(k, ports[k % len(ports)], log) for k in range(PARTITIONS)]
    try:
        for consumer in consumers:
            assert consumer.subscribed.wait(10), f"partition {consumer.partition} not subscribed"

        sent = publish(ports[0], range(2))
        wait_until(lambda: len(log) >= sent, 20)
        time.sleep(0.5)  # anything extra (a duplicate) would arrive now
        counts = Counter((stream, n) for _, stream, n in log)
        assert len(counts) == sent and set(counts.values()) == {1}, "lost or duplicated"
        homes: dict[str, set[int]] = {}
        for partition, stream, _ in log:
            homes.setdefault(stream, set()).add(partition)
        assert all(len(parts) == 1 for parts in homes.values()), "a stream on two partitions"
        for stream, parts in homes.items():
            assert parts == {partition_of(stream, PARTITIONS)}, f"{stream}: not oteo's partition"
        used = {next(iter(parts)) for parts in homes.values()}
        assert len(used) == PARTITIONS, f"200 streams reached only partitions {sorted(used)}"

        # kill -9 the third node; its consumers move to the first one with the same client id.
        cluster.kill(2)
        for consumer in consumers:
            if consumer.port == ports[2]:
                consumer.move_to(ports[0])
        for consumer in consumers:
            assert consumer.subscribed.wait(20), f"partition {consumer.partition} lost"
        sent += publish(ports[1], range(2, 4))
        # Unacknowledged deliveries of the dead node come back after ack_wait.
        wait_until(lambda: len({(s, n) for _, s, n in log}) >= sent, 20 + ACK_WAIT_S)
        received = {(stream, n) for _, stream, n in log}
        expected = {(f"s{i:03d}", n) for i in range(STREAMS) for n in range(4)}
        assert received == expected, f"lost {len(expected - received)} readings"
        for partition, stream, _ in log:
            assert homes[stream] == {partition}, f"{stream} moved partition after the kill"
        print(f"after the node kill: {len(log) - sent} duplicates of {sent} readings")
    finally:
        for consumer in consumers:
            consumer.close()
