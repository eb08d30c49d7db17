"""Hot reloads between real models of other channels, windows, hops and architectures, while
streams publish: the daemon never dies, and every message ends in exactly one result.

The scenario of issue 14 (A.1): `oteo run` on a model file, five streams publishing, the file
atomically replaced by a model with other channels, then SIGHUP. Before the fix the daemon died
with `ValueError: expected values of shape (3,), got (8,)` from the window buffer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import OteoProcess, Publisher, daemon_config, wait_until

from training.simulator import CHANNELS, simulate

REPO = Path(__file__).resolve().parents[2]
STREAMS = 5
RATE_HZ = 50.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four real model files: 8 and 3 channels, windows 32 / 16 / 12, hops 1 and 2,
    conv1d, dense and GRU."""
    from training.config import FitConfig, ModelConfig, TrainOptions
    from training.data import from_array
    from training.pipeline import train

    out = tmp_path_factory.mktemp("swap-models")
    values = simulate(2400, seed=3).values
    three = CHANNELS[:3]
    specs = [
        ("dense8", CHANNELS, {"window": 16}, 1),
        ("dense3", three, {"window": 16}, 2),
        ("gru3", three, {"window": 12, "architecture": "gru"}, 1),
    ]
    paths = [REPO / "models" / "demo.onnx"]  # conv1d, 8 channels, window 32
    for name, channels, model, hop in specs:
        table = from_array(values[:, : len(channels)], 1.0, channels=list(channels))
        opts = TrainOptions(
            model=ModelConfig(channels=len(channels), hidden=16, code_size=4, **model),
            fit=FitConfig(max_epochs=2, progress=False),
            name=name,
            hop=hop,
        )
        paths.append(train(table, opts, out / f"{name}.onnx").path)
    return paths


def test_random_hot_reloads_never_kill_the_daemon_and_every_message_is_accounted(
    models: list[Path], mosquitto, tmp_path: Path
) -> None:
    served = tmp_path / "live.onnx"
    shutil.copyfile(models[0], served)
    config = daemon_config(tmp_path, mosquitto.url, served)
    daemon = OteoProcess(tmp_path, config)
    try:
        daemon.start()
        swap_while_publishing(daemon, served, models, mosquitto)
    finally:
        daemon.kill()


def swap_while_publishing(daemon: OteoProcess, served: Path, models: list[Path], mosquitto) -> None:
    rows = simulate(4000, seed=9).values
    stop = threading.Event()
    sent = {"messages": 0}

    def publish() -> None:
        # Streams 0, 2, 4 send the 8 channels by name, streams 1 and 3 the first three: whichever
        # does not fit the model being served is refused as missing/unknown channel.
        pub = Publisher(mosquitto.host, mosquitto.port)
        t0, i = time.time() - 3600, 0
        while not stop.is_set():
            for s in range(STREAMS):
                names = CHANNELS if s % 2 == 0 else CHANNELS[:3]
                values = dict(zip(names, rows[i % len(rows)].tolist(), strict=False))
                payload = json.dumps({"ts": t0 + i, "values": values})
                pub.send(f"sensors/s{s}/data", payload, qos=1)
                sent["messages"] += 1
            i += 1
            time.sleep(1 / RATE_HZ)
        pub.close(flush=True)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    order = [*random.Random(14).choices(range(1, len(models)), k=7), 0]
    for k, index in enumerate(order, start=1):
        time.sleep(random.Random(k).uniform(0.4, 1.2))
        tmp = served.with_name("live.onnx.tmp")
        tmp.write_bytes(models[index].read_bytes())
        os.replace(tmp, served)
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_metric(
            lambda m, k=k: m("oteo_model_reloads_total", result="ok") >= k,
            20,
            f"reload {k} (model {models[index].name})",
        )
        assert daemon.running, daemon.log_text()[-3000:]
    stop.set()
    thread.join(30)

    later = ("model_changed", "duplicate", "late")  # counted again after `ok` at intake

    def settled(m) -> bool:
        at_intake = sum(
            v for labels, v in m.series("oteo_messages_total") if labels["result"] not in later
        )
        return at_intake >= sent["messages"]

    m = daemon.wait_metric(settled, 30, "every message counted")
    results = {labels["result"]: v for labels, v in m.series("oteo_messages_total") if v}
    # Each message has one intake result: ok, or why it was refused (here: the channels it
    # names do not fit the model being served).
    assert sum(v for r, v in results.items() if r not in later) == sent["messages"], results
    # Every reading the intake took is either in exactly one model's windows or counted as
    # dropped with a reason: parsed for a model whose channels then changed, duplicate, late.
    taken = m("oteo_readings_total")
    assert results["ok"] == taken + sum(results.get(r, 0) for r in later), results
    assert results.get("internal_error", 0) == 0 and m("oteo_errors_total", stage="engine") == 0
    assert m("oteo_windows_scored_total") > 0
    assert wait_until(lambda: daemon.get("/healthz")[0] == 200, 5)
    assert daemon.stop() == 0
    print(f"{sent['messages']} messages over {len(order)} reloads: {results}")
