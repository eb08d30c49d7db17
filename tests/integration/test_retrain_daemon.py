"""Record -> retrain -> promote against the running daemon: real Mosquitto, real `oteo run`.

Two pumps whose pressure sensor was replaced (a permanent offset) report to a daemon that
records them; the champion alarms on the new level. `oteo retrain --promote` runs on the live
recording while pump-1 keeps reporting: the daemon hot-reloads the challenger between two batches.
Every window of pump-1 is scored exactly once across the swap (its score messages and
`oteo_windows_scored_total` agree with the number of readings), the alarm ends, the new level
raises no new one, and a real fault still does.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import (
    OteoProcess,
    Publisher,
    Watcher,
    batched_readings,
    daemon_config,
    oteo_command,
    wait_until,
)
from host_program import require

from daemon.model import Model
from daemon.recording import FILE_NAME
from training.fault import inject
from training.simulator import CHANNELS, reference_scales, simulate

ROWS = 16000  # per pump, recorded before retraining (4.4 h at 1 Hz)
BATCH = 100  # readings per MQTT message
SHIFTED = 4  # pressure_bar
Broker = Any


def shifted(rows: int, seed: int) -> np.ndarray:
    out = simulate(rows, seed=seed).values
    out[:, SHIFTED] += 4.0 * reference_scales()[0][SHIFTED]
    return out


def messages(stream: str, values: np.ndarray, t0: float) -> Iterator[tuple[str, bytes]]:
    return batched_readings(stream, values, t0, BATCH)


@pytest.fixture(scope="module")
def champion(train_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data import from_array
    from training.simulator import simulate_runs

    table = from_array(simulate_runs(6000, seed=1, runs=2).values, 1.0, channels=CHANNELS)
    out = tmp_path_factory.mktemp("champion") / "pump.onnx"
    # Thresholds that do not move with the stream: the test reads the swap from them (no warm-up
    # either: its thresholds, 6 x the calibrated ones, drop when it ends).
    static = {"baseline_samples": 0, "new_level_s": 0.0, "warmup_s": 0.0}
    train_tiny(out, table=table, epochs=10, hidden=32, options=static)
    return out


def scores(watcher: Watcher, stream: str) -> list[dict[str, Any]]:
    return watcher.docs(f"oteo/{stream}/score")


def starts(watcher: Watcher, stream: str) -> list[dict[str, Any]]:
    return [e for e in watcher.docs(f"oteo/{stream}/event") if e["kind"] == "start"]


def test_record_retrain_promote_swaps_without_losing_or_repeating_a_window(
    champion: Path, mosquitto: Broker, tmp_path: Path
) -> None:
    live = tmp_path / "model.onnx"
    live.write_bytes(champion.read_bytes())
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        live,
        topics={"publish_scores": True},
        record={"streams": ["pump-*"]},
        # Retraining pauses the publishers for a while: no stream may turn stale meanwhile
        # (a stale stream warms up again, which would change the count of windows).
        ingest={"stale_after_s": 3600},
    )
    daemon = OteoProcess(tmp_path, config)
    watcher = Watcher(mosquitto.host, mosquitto.port, (("oteo/#", 1),))
    daemon.start()
    try:
        window = Model.load(live).window
        t0 = time.time() - 80_000
        pub = Publisher(mosquitto.host, mosquitto.port)
        # pump-1 runs on through retraining: phase B continues its series without a jump.
        run_1 = shifted(ROWS + 40_000, 11)
        pub.send_all(messages("pump-1", run_1[:ROWS], t0))
        pub.send_all(messages("pump-2", shifted(ROWS, 12), t0))
        pub.close()  # idle during retraining: it would miss its keep-alives
        daemon.wait_metric(
            lambda m: m("oteo_recorder_readings_total") == 2 * ROWS, 30, "recording phase A"
        )
        daemon.wait_metric(
            lambda m: m("oteo_windows_scored_total") == 2 * (ROWS - window + 1), 30, "phase A"
        )
        watcher.wait_for(
            lambda _: starts(watcher, "pump-1") and starts(watcher, "pump-2"),
            10,
            "the champion's alarms on the new level",
        )
        champion_threshold = scores(watcher, "pump-1")[-1]["threshold"]

        # Retrain on the live recording while pump-1 keeps reporting.
        more = run_1[ROWS:]  # more than needed: publishing stops soon after the swap
        sent = [0]
        reloaded = threading.Event()

        def keep_publishing() -> None:
            feed = Publisher(mosquitto.host, mosquitto.port)
            after = 0
            for topic, payload in messages("pump-1", more, t0 + ROWS):
                feed.send(topic, payload)
                sent[0] += BATCH
                if reloaded.is_set():
                    after += 1
                    if after >= 10:
                        break
                # Paced like a device, slowly enough that on a loaded machine (retraining took
                # 45 s there) the pump has not moved on to data unlike what the challenger was
                # trained on by the time of the swap: 100 rows a second.
                time.sleep(1.0)
            feed.close()

        thread = threading.Thread(target=keep_publishing)
        thread.start()
        # The README's copy of a live recording, made while the daemon writes to it.
        copy = tmp_path / "copy.sqlite3"
        backup = subprocess.run(
            [require("sqlite3"), str(daemon.state_dir / FILE_NAME), f".backup {copy}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert backup.returncode == 0, backup.stderr
        began = time.monotonic()
        result = subprocess.run(
            oteo_command(
                "retrain",
                "--store",
                str(copy),
                "--config",
                str(daemon.config_path),
                "--out",
                str(tmp_path / "next.onnx"),
                "--promote",
                "--normal-since",
                str(t0),
                "--hidden",
                "32",
                "--epochs",
                "10",
                "--fault-trials",
                "10",
                "--json",
            ),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        print(f"retrain took {time.monotonic() - began:.1f} s")
        print(
            "champion vs challenger:",
            json.dumps({k: report[k] for k in ("champion", "challenger")}),
        )
        assert report["promoted"] is True, report["reasons"]
        daemon.wait_metric(
            lambda m: m("oteo_model_reloads_total", result="ok") == 1, 15, "the hot reload"
        )
        reloaded.set()
        thread.join(120)
        assert not thread.is_alive()
        rows_1 = ROWS + sent[0]
        expected = 2 * (ROWS - window + 1) + sent[0]
        daemon.wait_metric(
            lambda m: m("oteo_windows_scored_total") == expected, 30, "every window scored"
        )
        got = wait_until(lambda: len(scores(watcher, "pump-1")) >= rows_1 - window + 1, 10)
        assert got, "score messages missing"
        ts = [s["ts"] for s in scores(watcher, "pump-1")]
        assert len(ts) == rows_1 - window + 1, "a window was lost or scored twice"
        assert len(set(ts)) == len(ts), "a window was scored twice"
        # Old model then new model, each window once: the threshold changes at one point only.
        thresholds = [s["threshold"] for s in scores(watcher, "pump-1")]
        changes = [i for i in range(1, len(thresholds)) if thresholds[i] != thresholds[i - 1]]
        assert len(changes) == 1 and thresholds[0] == champion_threshold
        assert thresholds[-1] != champion_threshold
        assert sent[0] - BATCH * 10 > 0, "the swap did not happen while pump-1 was reporting"

        # The champion's alarm ended on the new model's scores, before pump-1 stopped.
        ends = [e for e in watcher.docs("oteo/pump-1/event") if e["kind"] == "end"]
        assert ends and ends[-1]["model"]["sha256"] == report["challenger"]["sha256"]
        # Another run of the pump (an hour later: a gap, its windows start afresh) raises no
        # alarm on the new level; a real fault on it does.
        before = len(starts(watcher, "pump-1"))
        t1 = t0 + rows_1 + 3600
        later = shifted(3000, 21)
        pub = Publisher(mosquitto.host, mosquitto.port)
        pub.send_all(messages("pump-1", later, t1))
        faulty, _ = inject(later, "level_shift", 1500, 300, np.random.default_rng(3), [0])
        daemon.wait_metric(
            lambda m: m("oteo_windows_scored_total") == expected + 3000 - window + 1,
            30,
            "the later run scored",
        )
        assert len(starts(watcher, "pump-1")) == before, "the new level still raises alarms"
        pub.send_all(messages("pump-1", faulty, t1 + 3000 + 3600))
        watcher.wait_for(
            lambda _: len(starts(watcher, "pump-1")) > before, 30, "an alarm on the real fault"
        )
        fault_start = starts(watcher, "pump-1")[-1]
        assert fault_start["model"]["sha256"] == report["challenger"]["sha256"]
        pub.close()

        # The recording kept everything (the periods in alarm marked) within its bounds.
        total = 2 * ROWS + sent[0] + 6000
        m = daemon.wait_metric(
            lambda m: m("oteo_recorder_readings_total") == total, 15, "every reading recorded"
        )
        assert m("oteo_recorder_dropped_total") == 0 and m("oteo_recorder_errors_total") == 0
    finally:
        daemon.stop()
        watcher.close()
    with sqlite3.connect(daemon.state_dir / FILE_NAME) as conn:
        marks = conn.execute("SELECT state, end_ts FROM mark").fetchall()
    assert {"alarm"} <= {state for state, _ in marks}
    assert all(end is not None for _, end in marks), "a stop closes every open mark"
