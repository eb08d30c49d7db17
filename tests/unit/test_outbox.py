"""The on-disk event outbox: order, acknowledgement, bounds, restarts, corruption, a full disk."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.outbox import Entry, Outbox, OutboxError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite"


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    box = Outbox(path, max_events=100, max_bytes=100_000)
    yield box
    box.close()


def topics(entries: list[Entry]) -> list[str]:
    return [e.topic for e in entries]


def test_entries_come_back_oldest_first(outbox: Outbox) -> None:
    ids = [outbox.add(f"oteo/s{i}/event", f"e{i}".encode()) for i in range(5)]
    assert ids == sorted(ids)
    entries = outbox.next_after(0, 10)
    assert topics(entries) == [f"oteo/s{i}/event" for i in range(5)]
    assert entries[2].payload == b"e2" and entries[2].qos == 1 and entries[2].retain is False
    assert topics(outbox.next_after(ids[1], 2)) == ["oteo/s2/event", "oteo/s3/event"]
    assert outbox.next_after(ids[-1], 10) == []


def test_add_keeps_qos_and_retain(outbox: Outbox) -> None:
    outbox.add("oteo/s/state", b"{}", qos=0, retain=True)
    (entry,) = outbox.next_after(0, 1)
    assert (entry.qos, entry.retain) == (0, True)
    assert entry.created > 0


def test_ack_removes_and_unknown_id_is_noop(outbox: Outbox) -> None:
    ids = [outbox.add("t", b"x" * 10) for _ in range(3)]
    outbox.ack(ids[1])
    outbox.ack(ids[1])
    outbox.ack(999_999)
    assert [e.id for e in outbox.next_after(0, 10)] == [ids[0], ids[2]]
    assert (len(outbox), outbox.bytes) == (2, 20)


def test_count_bound_drops_oldest(path: Path) -> None:
    box = Outbox(path, max_events=3, max_bytes=100_000)
    for i in range(5):
        box.add(f"t{i}", b"x")
    assert topics(box.next_after(0, 10)) == ["t2", "t3", "t4"]
    assert (len(box), box.dropped, box.dropped_total) == (3, 2, 2)
    box.close()


def test_byte_bound_drops_oldest(path: Path) -> None:
    box = Outbox(path, max_events=100, max_bytes=250)
    for i in range(3):
        box.add(f"t{i}", b"x" * 100)
    # 300 bytes do not fit in 250: the oldest goes.
    assert topics(box.next_after(0, 10)) == ["t1", "t2"]
    assert (box.bytes, box.dropped) == (200, 1)
    # One large event displaces as many old ones as it needs.
    box.add("big", b"y" * 240)
    assert topics(box.next_after(0, 10)) == ["big"]
    assert (box.bytes, box.dropped) == (240, 3)
    box.close()


def test_event_larger_than_outbox_is_refused_without_dropping(path: Path) -> None:
    box = Outbox(path, max_events=100, max_bytes=100)
    box.add("keep", b"x" * 50)
    with pytest.raises(OutboxError, match="larger than the outbox"):
        box.add("huge", b"x" * 101)
    assert topics(box.next_after(0, 10)) == ["keep"]
    assert box.dropped == 0
    box.close()


def test_reopen_keeps_entries_and_dropped_total(path: Path) -> None:
    box = Outbox(path, max_events=2, max_bytes=100_000)
    for i in range(4):
        box.add(f"t{i}", b"abc")
    last = box.next_after(0, 10)[-1].id
    box.close()

    box = Outbox(path, max_events=2, max_bytes=100_000)
    assert topics(box.next_after(0, 10)) == ["t2", "t3"]
    assert (len(box), box.bytes) == (2, 6)
    assert (box.dropped, box.dropped_total) == (0, 2)  # `dropped` counts since this open
    box.add("t4", b"abc")
    assert (box.dropped, box.dropped_total) == (1, 3)
    for entry in box.next_after(0, 10):
        box.ack(entry.id)
    box.close()

    # Ids are never reused, even once everything was acknowledged.
    box = Outbox(path, max_events=2, max_bytes=100_000)
    assert len(box) == 0 and box.dropped_total == 3
    assert box.add("t5", b"abc") > last + 1
    box.close()


def test_process_crash_loses_nothing(path: Path) -> None:
    # A child adds events and dies without closing: every committed event is in the file.
    script = (
        "import os, sys; from pathlib import Path; from daemon.outbox import Outbox\n"
        "box = Outbox(Path(sys.argv[1]), max_events=100, max_bytes=100_000)\n"
        "for i in range(20): box.add(f't{i}', b'payload')\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, timeout=60)
    assert result.returncode == 9
    box = Outbox(path, max_events=100, max_bytes=100_000)
    assert topics(box.next_after(0, 100)) == [f"t{i}" for i in range(20)]
    box.close()


def test_another_connection_sees_committed_events(outbox: Outbox, path: Path) -> None:
    outbox.add("t", b"x")
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM event").fetchone() == (1,)
    other.close()


def test_corrupt_file_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    box = Outbox(path, max_events=10, max_bytes=10_000)
    (aside,) = path.parent.glob("outbox.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage
    assert "corrupt" in caplog.text
    assert len(box) == 0
    box.add("t", b"fresh")
    assert topics(box.next_after(0, 10)) == ["t"]
    box.close()


def test_damaged_pages_are_moved_aside(path: Path) -> None:
    box = Outbox(path, max_events=1000, max_bytes=1_000_000)
    for i in range(200):
        box.add(f"t{i}", os.urandom(500))
    box.close()
    data = bytearray(path.read_bytes())
    data[4096 : 4096 * 3] = os.urandom(4096 * 2)  # keep the header, wreck the pages after it
    path.write_bytes(bytes(data))
    box = Outbox(path, max_events=1000, max_bytes=1_000_000)
    assert len(box) == 0
    assert len(list(path.parent.glob("outbox.sqlite.corrupt-*"))) == 1
    box.close()


def test_unopenable_location_raises_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutboxError):
        Outbox(blocker / "outbox.sqlite", max_events=10, max_bytes=10_000)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 256 KiB tmpfs if we may mount one (root with CAP_SYS_ADMIN), else None."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)]
        mounted = subprocess.run(mount, capture_output=True).returncode == 0
    except OSError:  # no mount(8) at all
        mounted = False
    yield mount_point if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """Write a ballast file until the file system is full."""
    ballast = directory / "ballast"
    with ballast.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return ballast


def test_disk_full_raises_outbox_error_and_recovers(small_disk: Path | None, path: Path) -> None:
    # Preferred: a real full file system. Without permission to mount, SQLite's own page cap
    # (max_page_count) produces the same SQLITE_FULL error from the same code path.
    mode = "tmpfs" if small_disk is not None else "max_page_count"
    db_path = small_disk / "outbox.sqlite" if small_disk is not None else path
    box = Outbox(db_path, max_events=100_000, max_bytes=100_000_000)
    box.add("before", b"x" * 100)
    if small_disk is not None:
        ballast = fill(small_disk)
    else:
        pages = box._db.execute("PRAGMA page_count").fetchone()[0]
        box._db.execute(f"PRAGMA max_page_count = {pages}")

    error = None
    for i in range(2000):  # the WAL reuses space it already has: keep adding until it is full
        try:
            box.add(f"t{i}", b"y" * 4000)
        except OutboxError as exc:
            error = exc
            break
    print(f"[{mode}] {error!r} after {i} events")
    assert error is not None, f"[{mode}] the outbox never reported a full disk"
    assert "full" in str(error), f"[{mode}] {error}"
    stored = len(box)
    assert len(box.next_after(0, 100_000)) == stored, f"[{mode}] count out of step after error"

    if small_disk is not None:
        ballast.unlink()
    else:
        box._db.execute("PRAGMA max_page_count = 1073741823")
    box.add("after", b"z" * 100)
    entries = box.next_after(0, 100_000)
    assert (entries[0].topic, entries[-1].topic) == ("before", "after"), f"[{mode}] lost order"
    assert len(box) == stored + 1, f"[{mode}] recovered outbox miscounts"
    box.close()
    print(f"disk-full path exercised: {mode}")
