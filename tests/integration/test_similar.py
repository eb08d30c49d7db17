"""Similar windows, seen_before and labels, end to end: real Mosquitto, real `oteo run`.

One recorded pump repeats the same fault (one channel stuck far off its level) three times, with
normal operation between. The first alarm is new (`seen_before` is []), the second names the
first; the operator labels the first a false alarm over MQTT and the second confirmed over HTTP;
the third start names both with their labels. `similar` by event id finds the other episodes'
windows, `GET /v1/events?label=…` lists them, and after a restart the memory is loaded back from
the recording: the same query gives the same answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from daemon_harness import OteoProcess, Publisher, Watcher, batched_readings, daemon_config

from training.simulator import reference_scales, simulate

Broker = Any
BATCH = 50
NORMAL, FAULT = 400, 120
STUCK = 2  # bearing_temp_c
TINY_ROWS = 3000  # tests/conftest.py: the tiny models' training rows


def pump_series() -> np.ndarray:
    """Normal, then three times the same fault with normal operation after each.

    The normal rows are the tiny model's training data (tests/conftest.py): normal for it.
    """
    values = simulate(TINY_ROWS, seed=1).values[: NORMAL + 3 * (FAULT + NORMAL)]
    level = reference_scales()[0][STUCK]
    for i in range(3):
        start = NORMAL + i * (FAULT + NORMAL)
        values[start : start + FAULT, STUCK] = values[start - 1, STUCK] + 8 * level
    return values


def messages(stream: str, values: np.ndarray, t0: float) -> Iterator[tuple[str, bytes]]:
    return batched_readings(stream, values, t0, BATCH)


def start_recording_daemon(
    model: Path, mosquitto: Broker, tmp_path: Path
) -> tuple[OteoProcess, Watcher]:
    """A daemon recording pump-*, and a watcher of everything it publishes."""
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        model,
        record={"streams": ["pump-*"]},
        # Static thresholds: each fault is one alarm that clears when it ends.
        alarm={"baseline_samples": 0, "new_level_s": 0},
        similar={"max_distance": 1},
        ingest={"stale_after_s": 3600},
    )
    daemon = OteoProcess(tmp_path, config)
    watcher = Watcher(mosquitto.host, mosquitto.port, (("oteo/#", 1),))
    daemon.start()
    return daemon, watcher


def events(watcher: Watcher, kind: str) -> list[dict[str, Any]]:
    return [e for e in watcher.docs("oteo/pump-1/event") if e["kind"] == kind]


def test_repeated_fault_is_seen_before_labelled_and_searchable(
    tiny_model_path: Path, mosquitto: Broker, tmp_path: Path
) -> None:
    daemon, watcher = start_recording_daemon(tiny_model_path, mosquitto, tmp_path)
    values = pump_series()
    t0 = time.time() - 10_000
    first_part = NORMAL + 2 * (FAULT + NORMAL)
    try:
        pub = Publisher(mosquitto.host, mosquitto.port)
        pub.send_all(messages("pump-1", values[:first_part], t0))
        watcher.wait_for(lambda _: len(events(watcher, "end")) >= 2, 30, "two episodes")
        first, second = events(watcher, "start")[:2]
        assert first["seen_before"] == []  # nothing like it yet
        seen = second["seen_before"]
        assert [s["event_id"] for s in seen] == [first["event_id"]]
        assert seen[0]["stream"] == "pump-1" and seen[0]["started"] == first["started"]
        assert 0 <= seen[0]["distance"] <= 1 and seen[0]["label"] is None

        # Label the first over MQTT (reply_to), the second over HTTP.
        reply_topic = f"test/replies/{daemon.instance}"
        replies = Watcher(mosquitto.host, mosquitto.port, ((reply_topic, 1),))
        request = {
            "event_id": first["event_id"],
            "label": "false_alarm",
            "by": "operator-7",
            "reply_to": reply_topic,
            "id": "l-1",
        }
        pub.send(f"oteo/ops/{daemon.instance}/label", json.dumps(request).encode())
        replies.wait_for(lambda received: received, 10, "the label reply")
        reply = replies.docs(reply_topic)[0]
        replies.close()
        assert reply["op"] == "label" and reply["id"] == "l-1"
        assert reply["episode"]["label"] == "false_alarm"
        assert reply["episode"]["labelled_by"] == "operator-7"
        status, doc = daemon.post_json(
            "/v1/ops/label",
            {"event_id": second["event_id"], "label": "confirmed", "cause": "bearing wear"},
        )
        assert status == 200 and doc["episode"]["cause"] == "bearing wear", doc
        status, doc = daemon.post_json(
            "/v1/ops/label", {"event_id": "f" * 32, "label": "confirmed"}
        )
        assert status == 404 and doc["error"] == "not_found"

        status, body = daemon.get("/v1/events?label=false_alarm")
        listed = json.loads(body)
        assert status == 200 and [e["event_id"] for e in listed] == [first["event_id"]]
        assert listed[0]["ended"] is not None and listed[0]["top_channels"]
        status, body = daemon.get("/v1/events?label=confirmed&stream=pump-1")
        assert [e["cause"] for e in json.loads(body)] == ["bearing wear"]
        status, body = daemon.get("/v1/events?limit=0")
        assert status == 400 and json.loads(body)["error"] == "bad_request"

        # The third fault: its start names both earlier episodes (the same channel off the same
        # way: the same residual signature), with their labels.
        pub.send_all(messages("pump-1", values[first_part:], t0 + first_part))
        watcher.wait_for(lambda _: len(events(watcher, "start")) >= 3, 30, "third episode")
        third = events(watcher, "start")[2]
        labels = {s["event_id"]: (s["label"], s["cause"]) for s in third["seen_before"]}
        assert labels == {
            first["event_id"]: ("false_alarm", None),
            second["event_id"]: ("confirmed", "bearing wear"),
        }
        watcher.wait_for(lambda _: len(events(watcher, "end")) >= 3, 30, "third end")
        # `similar` over MQTT: the first episode's nearest alarm windows elsewhere.
        replies = Watcher(mosquitto.host, mosquitto.port, ((reply_topic, 1),))
        request = {
            "event_id": first["event_id"],
            "alarm_only": True,
            "k": 3,
            "exclude_s": 60,
            "reply_to": reply_topic,
        }
        pub.send(f"oteo/ops/{daemon.instance}/similar", json.dumps(request).encode())
        replies.wait_for(lambda received: received, 10, "the similar reply")
        reply = replies.docs(reply_topic)[0]
        replies.close()
        assert reply["op"] == "similar" and len(reply["hits"]) == 3
        assert {h["event_id"] for h in reply["hits"]} <= {second["event_id"], third["event_id"]}
        pub.close()

        # Search by event id: by residual signature among the other episodes' alarm windows,
        # not its own neighbourhood.
        query = {"event_id": second["event_id"], "k": 5, "alarm_only": True, "exclude_s": 60}
        status, found = daemon.post_json("/v1/ops/similar", query)
        assert status == 200, found
        assert found["by"] == "signature" and found["nbits"] == 3 * 8
        assert 3 * FAULT / 2 < found["windows"] < len(values) / 2  # the alarm windows
        assert len(found["hits"]) == 5
        others = {first["event_id"], third["event_id"]}
        assert all(h["alarm"] and h["event_id"] in others for h in found["hits"])
        assert all(h["distance"] <= found["hits"][-1]["distance"] for h in found["hits"])
        by_label = {h["event_id"]: h["label"] for h in found["hits"]}
        assert by_label.get(first["event_id"], "false_alarm") == "false_alarm"
        # By stream and time: the window of pump-1 at the second start.
        query_at = {"stream": "pump-1", "ts": second["started"], "k": 3, "exclude_s": 0}
        status, at = daemon.post_json("/v1/ops/similar", query_at)
        assert status == 200 and at["by"] == "code" and len(at["hits"]) == 3
        assert all(h["distance"] == 0 for h in at["hits"])  # its own bits, other windows
        assert second["started"] not in [h["ts"] for h in at["hits"]]  # itself left out
        status, doc = daemon.post_json("/v1/ops/similar", {"stream": "pump-9", "ts": 0.0})
        assert status == 404 and doc["error"] == "not_found"
        status, doc = daemon.post_json("/v1/ops/similar", {"k": 3})
        assert status == 400 and "exactly one" in doc["message"]

        m = daemon.metrics()
        assert m("oteo_event_labels", label="false_alarm") == 1
        assert m("oteo_event_labels", label="confirmed") == 1
        assert m("oteo_alarm_starts_total", stream="pump-1", seen="new") == 1
        assert m("oteo_alarm_starts_total", stream="pump-1", seen="before") == 2
        windows = len(values) - 15
        daemon.wait_metric(lambda m: m("oteo_similar_windows") == windows, 5, "the gauge")
        assert daemon.metrics()("oteo_similar_index_bytes") > 0
    finally:
        watcher.close()
        assert daemon.stop() == 0

    # After a restart the memory comes back from the recording.
    daemon.start()
    try:
        assert daemon.metrics()("oteo_similar_windows") == windows
        status, again = daemon.post_json("/v1/ops/similar", query)
        assert status == 200 and again["hits"] == found["hits"]
    finally:
        assert daemon.stop() == 0


def test_a_false_alarm_label_can_mute_similar_episodes_for_a_while(
    tiny_model_path: Path, mosquitto: Broker, tmp_path: Path
) -> None:
    daemon, watcher = start_recording_daemon(tiny_model_path, mosquitto, tmp_path)
    values = pump_series()[: NORMAL + 2 * (FAULT + NORMAL)]  # the fault twice
    t0 = time.time() - 10_000
    first_part = NORMAL + FAULT + NORMAL
    try:
        pub = Publisher(mosquitto.host, mosquitto.port)
        pub.send_all(messages("pump-1", values[:first_part], t0))
        watcher.wait_for(lambda _: events(watcher, "end"), 30, "the first episode")
        first = events(watcher, "start")[0]
        request = {"event_id": first["event_id"], "label": "confirmed", "mute_similar_s": 60}
        status, doc = daemon.post_json("/v1/ops/label", request)
        assert status == 400 and "false_alarm only" in doc["message"]
        request = {"event_id": first["event_id"], "label": "false_alarm", "mute_similar_s": 3600}
        status, doc = daemon.post_json("/v1/ops/label", request)
        assert status == 200 and doc["episode"]["mute_similar_until"] is not None, doc

        # The same fault again: held back (state muted), counted, visible in /v1/streams.
        second_start = t0 + first_part
        pub.send_all(messages("pump-1", values[first_part : first_part + 60], second_start))
        daemon.wait_metric(lambda m: m("oteo_alarms_suppressed_total") == 1, 20, "suppressed")
        _, body = daemon.get("/v1/streams")
        (pump,) = json.loads(body)
        assert pump["state"] == "muted" and pump["suppressed_by"] == first["event_id"]
        pub.send_all(messages("pump-1", values[first_part + 60 :], second_start + 60))
        daemon.wait_metric(
            lambda m: m("oteo_windows_scored_total") == len(values) - 15, 30, "every window"
        )
        pub.close()
        assert len(events(watcher, "start")) == 1, "the similar episode was announced"

        def states() -> list[str]:
            return [d["state"] for d in watcher.docs("oteo/pump-1/state")]

        watcher.wait_for(lambda _: states()[-1] == "normal", 10, "normal after the episode")
        assert "muted" in states()
        _, body = daemon.get("/v1/events?label=false_alarm")
        assert json.loads(body)[0]["mute_similar_until"] is not None
    finally:
        watcher.close()
        assert daemon.stop() == 0
