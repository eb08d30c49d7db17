"""The partition function (the broker's FNV-1a 32), `oteo partition`, `[partitions]` and the
ledger that holds acknowledgements until a checkpoint covers them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from daemon.cli import main
from daemon.config import ConfigError, load_config
from daemon.mqtt.ledger import AckLedger
from daemon.partition import fnv1a_32, nats_mapping, partition_of
from daemon.window import StreamBuffer
from daemon.window_state import restore_window, snapshot_window


@pytest.mark.parametrize(
    ("data", "expected"),
    [  # the reference vectors of the FNV-1a 32-bit hash (draft-eastlake-fnv)
        (b"", 0x811C9DC5),
        (b"a", 0xE40C292C),
        (b"foobar", 0xBF9CF968),
    ],
)
def test_fnv1a_32_matches_the_reference_vectors(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


def test_partition_is_the_hash_of_the_stream_id_modulo_the_count() -> None:
    assert partition_of("foobar", 16) == 0xBF9CF968 % 16
    assert {partition_of(f"s{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least 1"):
        partition_of("a", 0)


def test_the_nats_mapping_names_the_partition_and_the_stream_token() -> None:
    assert nats_mapping(16) == (
        '"sensors.*.data": "part.{{partition(16,1)}}.sensors.{{wildcard(1)}}.data"'
    )


def test_oteo_partition_prints_the_partition() -> None:
    runner = CliRunner()
    plain = runner.invoke(main, ["partition", "foobar", "--count", "16"])
    assert plain.exit_code == 0 and plain.output == "8\n"
    as_json = runner.invoke(main, ["partition", "foobar", "--count", "16", "--json"])
    assert json.loads(as_json.output) == {"stream": "foobar", "count": 16, "partition": 8}
    assert runner.invoke(main, ["partition", "x", "--count", "0"]).exit_code == 2
    assert runner.invoke(main, ["partition", "--count", "4"]).exit_code == 2
    mapping = runner.invoke(main, ["partition", "--count", "4", "--mapping"])
    assert mapping.output == f"mappings = {{ {nats_mapping(4)} }}\n"


def test_run_takes_the_config_once(tmp_path: Path) -> None:
    path = tmp_path / "oteo.toml"
    path.write_text('[model]\npath = "m.onnx"\n')
    result = CliRunner().invoke(main, ["run", str(path), "--config", str(path)])
    assert result.exit_code == 2 and "CONFIG or --config, not both" in result.output


def _config(tmp_path: Path, **partitions: object) -> object:
    overrides: dict[str, object] = {
        "model.path": str(tmp_path / "m.onnx"),
        "state_dir": str(tmp_path),
        "mqtt.protocol": "3.1.1",
    }
    overrides.update({f"partitions.{k}": v for k, v in partitions.items()})
    return load_config(None, overrides)


def test_index_of_owns_every_partition_congruent_to_the_index(tmp_path: Path) -> None:
    cfg = _config(tmp_path, count=8, index=1, of=3)
    assert cfg.partitions.partitions == (1, 4, 7)  # type: ignore[attr-defined]
    cfg = _config(tmp_path, count=8, owned=[5, 2])
    assert cfg.partitions.partitions == (2, 5)  # type: ignore[attr-defined]
    assert cfg.partitions.client_id(5) == "oteo-oteo-part-5"  # type: ignore[attr-defined]
    assert cfg.partitions.topic(5, "sensors") == "part/5/sensors/+/data"  # type: ignore[attr-defined]
    assert _config(tmp_path).partitions.partitions == ()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("partitions", "message"),
    [
        ({"count": 4, "index": 4, "of": 4}, "partitions: index: 4 is not below of (4)"),
        ({"count": 4, "owned": [4]}, "partitions: owned: partition 4 is not in 0..3"),
        ({"count": 4, "owned": [1, 1]}, "partitions: owned: a partition is listed twice"),
        ({"count": 4, "owned": [1], "index": 0, "of": 2}, "partitions: give either owned or"),
        ({"count": 4}, "partitions: give owned, or both index and of"),
        ({"index": 0, "of": 2}, "partitions: index, of need count"),
        (
            {"count": 4, "index": 0, "of": 2, "checkpoint_s": 45.0},
            "partitions: checkpoint_s must be below redelivery_wait_s",
        ),
        (
            {"count": 4, "index": 0, "of": 2, "checkpoint_readings": 1024},
            "partitions.checkpoint_readings: Input should be less than 1024",
        ),
    ],
)
def test_bad_partitions_fail_with_one_line_naming_the_field(
    tmp_path: Path, partitions: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **partitions)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_partitions_need_mqtt_3_1_1(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape('mqtt.protocol = "3.1.1"')):
        load_config(
            None,
            {"model.path": "m.onnx", "partitions.count": 2, "partitions.owned": [0]},
        )


def test_the_partition_index_override_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "oteo.toml"
    path.write_text(
        '[model]\npath = "m.onnx"\n[mqtt]\nprotocol = "3.1.1"\n'
        "[partitions]\ncount = 4\nindex = 0\nof = 2\n"
    )
    assert load_config(path, {"partitions.index": 1}).partitions.partitions == (1, 3)


# -- ledger -----------------------------------------------------------------------------------


def _take(ledger: AckLedger, mid: int, generation: int = 0, *, queued: bool = True) -> int:
    """What the link's network thread does for one message the intake took."""
    ticket = ledger.issue()
    if queued:
        ledger.queued(ticket)
    assert ledger.keep(mid, generation) is queued
    return ticket


def test_acks_are_released_only_once_a_checkpoint_covers_them() -> None:
    ledger = AckLedger()
    tickets = [_take(ledger, mid) for mid in (11, 12, 13)]
    assert ledger.release(0) == []
    ledger.cover(tickets[1])
    assert ledger.release(0) == [11, 12]
    assert len(ledger) == 1
    ledger.cover(tickets[0])  # never goes back
    assert ledger.release(0) == []
    ledger.cover(tickets[2])
    assert ledger.release(0) == [13]


def test_a_dropped_message_is_acknowledged_at_once() -> None:
    ledger = AckLedger()
    _take(ledger, 1, queued=False)  # a bad payload: nothing to checkpoint
    assert len(ledger) == 0


def test_acks_of_a_lost_connection_are_dropped_not_sent_on_the_next() -> None:
    ledger = AckLedger()
    old = _take(ledger, 7, generation=0)
    new = _take(ledger, 7, generation=1)  # the same mid again, after a reconnect
    ledger.cover(max(old, new))
    assert ledger.release(1) == [7]
    assert len(ledger) == 0


# -- the window's checkpoint ------------------------------------------------------------------


def _buffer() -> StreamBuffer:
    return StreamBuffer(8, 2, hop=3, period_s=1.0, max_gap_s=5.0)


def test_a_restored_window_goes_on_as_if_never_stopped() -> None:
    def push(buffer: StreamBuffer, t: int) -> np.ndarray | None:
        out = buffer.push(1000.0 + t, np.array([t, 2.0 * t]), t)
        return buffer.take().copy() if out.windows_ready else None

    straight = _buffer()
    expected = [w for t in range(30) if (w := push(straight, t)) is not None]
    before = _buffer()
    for t in range(13):
        push(before, t)
    after = _buffer()
    restore_window(after, json.loads(json.dumps(snapshot_window(before))))
    resumed = [w for t in range(13, 30) if (w := push(after, t)) is not None]
    assert len(resumed) == 6
    assert all(np.array_equal(a, b) for a, b in zip(expected[-6:], resumed, strict=True))
    # Readings the checkpoint holds come back as duplicates (by seq, and by slot).
    assert after.push(1012.0, np.zeros(2), 12).result.value == "duplicate"
    assert after.push(1001.0, np.zeros(2), 1).result.value == "duplicate"


def test_a_warming_window_restores_its_warm_up_progress() -> None:
    before = _buffer()
    for t in range(5):
        before.push(1000.0 + t, np.zeros(2), t)
    after = _buffer()
    restore_window(after, snapshot_window(before))
    outs = [after.push(1000.0 + t, np.zeros(2), t).windows_ready for t in range(5, 8)]
    assert outs == [0, 0, 1]  # the 8th sample completes the first window


def test_a_snapshot_of_another_window_size_is_refused() -> None:
    big = StreamBuffer(16, 2, hop=1, period_s=1.0, max_gap_s=5.0)
    for t in range(16):
        big.push(1000.0 + t, np.zeros(2), t)
    with pytest.raises(ValueError, match="does not fit"):
        restore_window(_buffer(), snapshot_window(big))


def test_instances_of_one_box_get_their_index_in_the_default_instance_name(
    tmp_path: Path,
) -> None:
    import socket

    cfg = _config(tmp_path, count=4, index=1, of=2)
    assert cfg.instance == f"{socket.gethostname()}-1"  # type: ignore[attr-defined]
    named = load_config(
        None,
        {
            "model.path": "m.onnx",
            "instance": "pump-room",
            "mqtt.protocol": "3.1.1",
            "partitions.count": 4,
            "partitions.owned": [0],
        },
    )
    assert named.instance == "pump-room"
