"""Scale out, end to end: `oteo benchmark scale --quick --json` on this machine.

A real 3-node nats-server cluster (JetStream, MQTT listener, the partition mapping over 16
partitions), the real `oteo run` with `[partitions]` and the demo model, 200 simulated streams
(every 10th with recurring faults), single readings at QoS 1:

- drained by 1 and then 2 instances: every stream scored by exactly one instance (their
  per-stream counters), all 200 scored;
- two instances at a fixed rate, one killed with -9 and restarted, then one NATS node killed:
  every reading scored (by seq: the window ending at it, from the published window scores),
  the restarted instance owns its partitions again, and no fault goes unalarmed.
"""

from __future__ import annotations

import json

import pytest
from daemon_harness import run_oteo
from host_program import require


@pytest.mark.timeout(330)
def test_scale_benchmark_quick_scores_every_stream_once_and_loses_nothing() -> None:
    require("nats-server")
    require("mosquitto")
    done = run_oteo("benchmark", "scale", "--quick", "--json", timeout_s=320)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    print(json.dumps(r, indent=1))  # the numbers, for the log
    for key in ("speedup", "streams_on_two_instances", "lost", "duplicates"):
        assert key in r, f"--json lacks {key}"
    assert r["streams_scored"] == 200 and r["streams_on_two_instances"] == 0
    assert sum(r["streams_per_instance_2"]) == 200
    assert r["drain_1_readings_per_s"] > 0 and r["drain_2_readings_per_s"] > 0
    assert r["mosquitto_1_readings_per_s"] > 0
    # kill -9 of an instance and of a NATS node: nothing lost, by seq, and no redelivery came
    # after newer readings (the restarted instance waited ack_wait + a margin).
    assert r["lost"] == 0, r
    assert r["redelivered_late_dropped"] == 0, r
    assert r["node_kill_continued"] is True and r["owned_after_node_kill"] == 16
    assert r["after_node_kill_lost"] == 0
    assert r["restart_to_owned_s"] is not None
    assert r["duplicates"] >= 0 and r["redelivered_duplicates_dropped"] >= 0
    # Every fault alarmed; the alarm policy's repeats are reported, not asserted away.
    assert r["faults"] >= 10 and r["faults_missed"] == 0, r
