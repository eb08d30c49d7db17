"""Which partitions' readings NATS stores yet, read from a node's /jsz (training/bench/fleet.py):
a QoS 1 subscription is a consumer of $MQTT_msgs, and it takes messages only once it has a
leader (its deliver policy is "new")."""

from __future__ import annotations

from typing import Any

from training.bench.fleet import subscribed_partitions


def consumer(subject: str, cluster: dict[str, Any] | None) -> dict[str, Any]:
    found: dict[str, Any] = {"config": {"filter_subject": subject, "deliver_policy": "new"}}
    if cluster is not None:
        found["cluster"] = cluster
    return found


def jsz(*streams: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    details = [{"name": name, "consumer_detail": cs} for name, cs in streams]
    return {"account_details": [{"stream_detail": details}]}


def test_a_partition_counts_once_its_consumer_has_a_leader() -> None:
    doc = jsz(
        (
            "$MQTT_msgs",
            [
                consumer("$MQTT.msgs.part.1.sensors.*.data", {"name": "oteo", "leader": "nats-2"}),
                consumer("$MQTT.msgs.part.2.sensors.*.data", {"name": "oteo"}),  # electing
                consumer("$MQTT.msgs.part.3.sensors.*.data", None),  # a single node
                consumer("$MQTT.msgs.oteo.4.event", {"leader": "nats-0"}),  # not a partition
            ],
        ),
        ("$MQTT_rmsgs", [consumer("$MQTT.msgs.part.5.sensors.*.data", {"leader": "nats-1"})]),
    )
    assert subscribed_partitions(doc) == {1, 3}


def test_a_node_without_jetstream_details_has_none() -> None:
    assert subscribed_partitions({}) == set()
    assert subscribed_partitions({"account_details": None}) == set()
