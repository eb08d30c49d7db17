"""The event journal: episodes on start and end, labels, listing, pruning, what retrain reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.journal import Journal, JournalError, read_labelled
from daemon.messages import ChannelContribution, Event, ModelRef, format_ts

MODEL = ModelRef(name="m", version="1", sha256="0" * 64)


def event(event_id: str, kind: str, started: float, ended: float | None = None) -> Event:
    top = [
        ChannelContribution(
            channel="flow",
            contribution=0.7,
            score=3.0,
            observed=1.0,
            expected=0.5,
            direction="high",
        )
    ]
    return Event(
        event_id=event_id,
        kind=kind,  # type: ignore[arg-type]
        stream="pump-1",
        instance="t",
        ts=format_ts(ended or started),
        started=format_ts(started),
        ended=format_ts(ended) if ended is not None else None,
        duration_s=ended - started if ended is not None else None,
        reason="cleared" if ended is not None else None,
        score=2.0,
        peak_score=5.0,
        threshold=1.0,
        p_value=0.001,
        top_channels=top,
        model=MODEL,
    )


def test_an_episode_is_written_on_start_and_completed_on_end(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "events.sqlite3")
    journal.record(event("a", "start", 100.0), start_word=5, peak_word=5)
    assert journal.get("a").ended_ts is None  # type: ignore[union-attr]
    high = (1 << 64) - 1  # a 64-bit word survives SQLite's signed integers
    journal.record(event("a", "end", 100.0, 160.0), start_word=5, peak_word=high)
    episode = journal.get("a")
    assert episode is not None
    assert (episode.started_ts, episode.ended_ts, episode.reason) == (100.0, 160.0, "cleared")
    assert (episode.start_word, episode.peak_word) == (5, high)
    assert episode.top_channels == ["flow"] and episode.label is None
    assert journal.get("nope") is None


def test_labels_replace_each_other_and_filter_the_listing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "events.sqlite3")
    for i, started in enumerate((100.0, 200.0, 300.0)):
        journal.record(event(f"e{i}", "start", started), start_word=None, peak_word=None)
    assert journal.label("missing", "confirmed") is None
    journal.label("e0", "confirmed", cause="wear", by="ann", at_ts=1000.0)
    labelled = journal.label("e0", "false_alarm", by="bob", at_ts=2000.0)
    assert labelled is not None and (labelled.label, labelled.cause) == ("false_alarm", None)
    journal.label("e2", "confirmed", cause="bearing wear")
    assert [e.event_id for e in journal.episodes()] == ["e2", "e1", "e0"]  # newest first
    assert [e.event_id for e in journal.episodes(label="none")] == ["e1"]
    assert [e.event_id for e in journal.episodes(label="confirmed")] == ["e2"]
    assert [e.event_id for e in journal.episodes(limit=1)] == ["e2"]
    assert journal.label_counts() == {"false_alarm": 1, "confirmed": 1}
    assert journal.labels_of(["e0", "e1"]) == {"e0": ("false_alarm", None)}
    doc = journal.get("e0").to_dict()  # type: ignore[union-attr]
    assert doc["labelled_by"] == "bob" and doc["labelled"] == format_ts(2000.0)
    journal.close()
    periods = read_labelled(tmp_path / "events.sqlite3")
    assert [(p.event_id, p.label, p.start_ts) for p in periods] == [
        ("e0", "false_alarm", 100.0),
        ("e2", "confirmed", 300.0),
    ]


def test_pruning_drops_the_oldest_unlabelled_episodes_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "events.sqlite3", max_events=10)
    journal.record(event("old", "start", 0.0), start_word=None, peak_word=None)
    journal.label("old", "confirmed")
    for i in range(1, 12):
        journal.record(event(f"e{i}", "start", float(i)), start_word=None, peak_word=None)
    kept = [e.event_id for e in journal.episodes(limit=100)]
    assert "old" in kept and len(kept) <= 10
    assert "e1" not in kept and "e11" in kept


def test_an_unreadable_journal_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "events.sqlite3"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match=r"events\.sqlite3"):
        Journal(bad)
    with pytest.raises(JournalError, match="no such event journal"):
        read_labelled(tmp_path / "missing.sqlite3")


def test_mutes_of_similar_episodes_expire_and_show_in_the_listing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "events.sqlite3")
    for name in ("a", "b"):
        journal.record(event(name, "start", 100.0), start_word=1, peak_word=1)
    journal.mute_similar("a", until_ts=500.0)
    journal.mute_similar("b", until_ts=50.0)
    assert journal.similar_mutes(now_ts=100.0) == {"a": 500.0}  # b's has run out
    assert journal.get("a").to_dict()["mute_similar_until"] == format_ts(500.0)  # type: ignore[union-attr]
    journal.mute_similar("a", None)
    assert journal.similar_mutes(now_ts=100.0) == {}
