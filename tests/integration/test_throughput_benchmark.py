"""`oteo benchmark throughput --quick --json` end to end: real Mosquitto, publisher processes,
the real daemon with the demo model. Checks the report's structure and that nothing was lost;
the speed figures themselves are for people to read, never asserted."""

from __future__ import annotations

import json

from daemon_harness import run_oteo

REQUIRED = (
    "transport_limit_msgs_per_s",
    "daemon_samples_per_s",
    "daemon_batched_samples_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_quarter_p50_ms",
    "latency_quarter_p99_ms",
    "latency_bare_p50_ms",
    "latency_bare_p99_ms",
    "rss_mb",
    "ready_s",
)


def test_quick_run_reports_every_figure_and_loses_no_reading() -> None:
    done = run_oteo("benchmark", "throughput", "--quick", "--json", timeout_s=170)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for key in (*REQUIRED, "cpu_s_per_1000_samples", "onnx_windows_per_s"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report.get(key))
    # 100 streams: two single-reading backlogs of 150 messages each, one of 5 x 100 readings.
    assert report["readings_sent"] == 2 * 100 * 150 + 100 * 5 * 100
    assert report["readings_lost"] == 0
    assert report["messages_dropped"] == 0
    assert report["latency_samples"] > 0
    assert report["latency_p50_ms"] <= report["latency_p99_ms"]
    assert report["latency_bare_p50_ms"] <= report["latency_bare_p99_ms"]
    assert report["latency_quarter_p50_ms"] <= report["latency_quarter_p99_ms"]
    assert report["latency_own_events"] > 0
    assert 0 <= report["latency_own_under_25ms"] <= report["latency_own_events"]
    assert report["pyod_ae_windows_per_s"] == "not installed" or report["pyod_ae_windows_per_s"] > 0
