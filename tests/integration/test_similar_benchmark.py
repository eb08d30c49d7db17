"""`oteo benchmark similar --quick --json`: two tiny models really trained, simulated streams
really encoded by onnxruntime and replayed through the detector, a real index searched. Checks
the report's structure and that every figure is a sane value; the figures themselves are for
people to read (docs/similar.md), never asserted."""

from __future__ import annotations

import json

from daemon_harness import run_oteo

KINDS = ("default", "hashing")


def share(value: object) -> bool:
    """A share in [0, 1], or None when no repeated fault was alarmed to ask with."""
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


def test_quick_run_reports_speed_memory_and_precision_for_both_model_kinds() -> None:
    done = run_oteo(
        "benchmark", "similar", "--quick", "--json", "--windows", "150000", timeout_s=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["windows"] == 150_000
    assert 0 < out["p50_ms"] <= out["p99_ms"]
    # Columns and key lists hold at least 21 bytes a window; growth slack stays below 2x.
    assert 21 * out["windows"] < out["index_bytes"] < 2 * 64 * out["windows"]
    for kind in KINDS:
        speed = out["speed"][kind]
        assert speed["windows"] == 150_000
        assert 0 < speed["p50_ms"] <= speed["p99_ms"] <= out["p99_ms"]
        assert speed["events_p99_ms"] > 0 and speed["add_us"] > 0 and speed["brute_force_ms"] > 0
        assert 1 <= speed["distinct_words"] <= 2**8  # the quick models have 8 code units
        assert share(out["precision_at_1"][kind])
        assert share(out["precision_at_1_peak"][kind])
        assert share(out["precision_at_1_first5"][kind])
        assert all(share(v) for v in out["precision_at_1_residual"][kind].values())
        assert set(out["precision_by_bits"][kind]) == {"8", "4"}
        assert all(share(v) for v in out["precision_by_bits"][kind].values())
        assert out["precision_at_1"][kind] == out["precision_by_bits"][kind]["8"]
        assert 0.0 <= out["recall_at_10"][kind] <= out["recall_10_at_100"][kind] <= 1.0
        episodes = out["episodes"][kind]
        assert 0 <= episodes["faults_alarmed"] <= episodes["faults"]
        assert 0 <= out["precision_queries"][kind] <= episodes["faults_alarmed"]
        assert out["residual_bits"][kind] == 24  # three bits for each of the pump's 8 channels
    assert "encoded by the model" in out["windows_made"]
