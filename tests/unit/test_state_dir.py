"""The state directory's stores refuse an unusable directory with one line naming the setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scorer_stub import make_manifest

from daemon.config import Config, load_config
from daemon.metrics import Metrics
from daemon.startup import StartupError
from daemon.state_dir import open_journal, open_outbox, open_recorder


def _config(state_dir: Path, **overrides: object) -> Config:
    return load_config(None, {"model.path": "m.onnx", "state_dir": str(state_dir), **overrides})


def test_a_state_dir_that_is_a_file_refuses_the_outbox_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError) as refused:
        open_outbox(_config(blocker))
    message = str(refused.value)
    assert message.startswith(f"state_dir: cannot use {blocker} for the outbox (")
    assert message.endswith("make it writable or set state_dir") and "\n" not in message


def test_a_journal_that_is_not_a_database_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "events.sqlite3").write_bytes(b"\x00" * 4096)
    with pytest.raises(StartupError, match=r"^state_dir: .*events\.sqlite3: cannot open"):
        open_journal(_config(tmp_path))


def test_the_outbox_makes_the_state_dir_and_the_journal_opens_in_it(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "new" / "state")
    outbox = open_outbox(cfg)
    journal = open_journal(cfg)
    try:
        assert (tmp_path / "new" / "state" / "outbox.sqlite3").is_file()
        assert (tmp_path / "new" / "state" / "events.sqlite3").is_file()
    finally:
        journal.close()
        outbox.close()


def test_the_recording_opens_only_for_recorded_streams(tmp_path: Path) -> None:
    manifest = make_manifest(["a", "b"], np.zeros(2), np.ones(2))
    assert open_recorder(_config(tmp_path), Metrics(), manifest) is None
    assert not any(tmp_path.iterdir())
    recorder = open_recorder(_config(tmp_path, **{"record.streams": ["s1"]}), Metrics(), manifest)
    assert recorder is not None
    recorder.close()
    assert recorder.path == tmp_path / "recording.sqlite3" and recorder.path.is_file()
