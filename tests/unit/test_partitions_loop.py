"""The main loop's side of partitions with stand-in links: checkpoints release held acks, an
unclean stop delays the sessions by redelivery_wait_s, a clean one does not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from scorer_stub import StubScorer, stub_for
from test_engine import make_engine

from daemon.intake import Intake
from daemon.mqtt import Incoming, LinkCounters
from daemon.mqtt.ledger import AckLedger
from daemon.partitions import Partitions
from daemon.window_state import snapshot_window
from training.simulator import MachineSimulator

ROWS = MachineSimulator(seed=5).step(120)


class FakeLink:
    """What Partitions asks of a session's link; the test plays its network thread."""

    def __init__(self, k: int, ledger: AckLedger | None, on_message: Any, on_state: Any) -> None:
        self.k, self.ledger, self.on_message = k, ledger, on_message
        self.started = False
        self.connected = True
        self.counters = LinkCounters()
        self.acked: list[int] = []

    def start(self) -> None:
        self.started = True

    def wake(self) -> None:
        pass

    def request_stop(self, timeout_s: float) -> None:
        pass

    def stop(self, timeout_s: float) -> bool:
        return True

    def deliver(self, mid: int, stream: str, row: int) -> None:
        """One reading arrives and is taken (as Inbox.deliver does)."""
        values = [round(float(v), 4) for v in ROWS[row]]
        payload = json.dumps({"ts": float(row), "seq": row, "values": values}).encode()
        msg = Incoming(f"part/{self.k}/sensors/{stream}/data", payload, 1, False, mid, None)
        assert self.on_message(msg)
        assert self.ledger is not None and self.ledger.keep(mid, 0)

    def release(self) -> None:
        assert self.ledger is not None
        self.acked += self.ledger.release(0)


def _setup(tmp_path: Path, **partitions: object) -> tuple[Partitions, dict[int, FakeLink], Any]:
    model: StubScorer = stub_for(ROWS, [f"ch{i}" for i in range(ROWS.shape[1])])
    settings = {"count": 2, "owned": [0, 1], "checkpoint_readings": 10, **partitions}
    overrides = {f"partitions.{k}": v for k, v in settings.items()}
    engine, _, metrics, _ = make_engine(model, tmp_path, **{"mqtt.protocol": "3.1.1", **overrides})
    intake = Intake(
        engine.cfg.ingest,
        metrics,
        input_prefix="sensors",
        ops_prefix="oteo/ops/t",
        channels=list(model.manifest.channels),
        on_op=lambda msg: None,
    )
    links: dict[int, FakeLink] = {}

    def make_link(k: int, ledger: Any, on_message: Any, on_state: Any) -> Any:
        links[k] = FakeLink(k, ledger, on_message, on_state)
        return links[k]

    parts = Partitions(engine.cfg, engine, intake, metrics, "sha", make_link)
    return parts, links, intake


def _drain(parts: Partitions, intake: Intake) -> None:
    while (work := intake.take(0.0)) is not None:
        parts.engine.handle(work)
        parts.note(work)
    assert parts.writer is not None
    parts.writer.flush()


def base_seq(doc: dict[str, Any], stream: str) -> int:
    return int(doc["streams"][stream]["window"]["last_seq"])


def test_acks_wait_for_the_checkpoint_that_holds_their_readings(tmp_path: Path) -> None:
    parts, links, intake = _setup(tmp_path)
    parts.start()
    link = links[0]
    assert link.started
    for i in range(15):
        link.deliver(100 + i, "a", i)
    _drain(parts, intake)  # 15 readings: one checkpoint after the 10th
    link.release()
    assert link.acked == list(range(100, 110))
    assert parts.engine.streams["a"].partition == 0
    parts.stop(timeout_s=1.0)
    link.release()
    assert link.acked == list(range(100, 115))  # the clean stop's checkpoint covers the rest
    doc = json.loads((tmp_path / "partitions" / "0.json").read_text())
    assert doc["clean"] is True
    assert base_seq(doc, "a") == 14


def test_an_unclean_stop_delays_the_session_by_the_redelivery_wait(tmp_path: Path) -> None:
    parts, links, intake = _setup(tmp_path, redelivery_wait_s=30.0)
    parts.start()
    for i in range(12):
        links[1].deliver(i + 1, "b", i)
    _drain(parts, intake)
    # No stop: the process died. The next one finds the checkpoint unclean, 5 s old.
    path = tmp_path / "partitions" / "1.json"
    os.utime(path, (time.time() - 5, time.time() - 5))
    again, links2, _ = _setup(tmp_path, redelivery_wait_s=30.0)
    again.start()
    assert links2 == {}  # both partitions were held by the dead run: neither connects yet
    waits = {k: p.connect_at - time.time() for k, p in again.parts.items()}
    assert 24.0 < waits[1] <= 26.0  # 30 s after its last sign of life (+1 s heartbeat)
    assert 29.0 < waits[0] <= 31.0
    stream = again.engine.streams["b"]
    assert snapshot_window(stream.buffer)["last_seq"] == 9  # the checkpoint after the 10th reading
    assert np.isclose(stream.last_ts, 9.0)
    again.stop(timeout_s=1.0)
