"""The committed JSON Schemas match the pydantic models they are generated from."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from daemon import jsonschema

SCHEMA_DIR = Path(jsonschema.__file__).parent / "schema"
FIX = "run `python -m daemon.jsonschema daemon/schema` and commit the result"
GENERATED = jsonschema.generate()


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_committed_schema_matches_the_model(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.schema.json"
    assert path.exists(), f"{path} is missing: {FIX}"
    committed = path.read_text(encoding="utf-8")
    assert committed == jsonschema.render(GENERATED[name]), f"{path} is out of date: {FIX}"


def test_no_stale_schema_files() -> None:
    stale = {p.name for p in SCHEMA_DIR.glob("*.schema.json")} - {
        f"{name}.schema.json" for name in GENERATED
    }
    assert not stale, f"schemas without a model: {sorted(stale)}; delete them or {FIX}"


def test_outputs_document_the_schema_version_key() -> None:
    for name in ["event", "state", "status", "window_score", "hash_reply", "error_reply"]:
        schema = GENERATED[name]
        assert "schema" in schema["required"], name
        assert "schema_version" not in schema["properties"], name


def test_schemas_do_not_depend_on_the_machine() -> None:
    text = jsonschema.render(GENERATED["config"])
    assert f'"{socket.gethostname()}"' not in text


def test_write_produces_sorted_indented_files(tmp_path: Path) -> None:
    written = jsonschema.write(tmp_path)
    assert {p.name for p in written} == {f"{name}.schema.json" for name in GENERATED}
    text = (tmp_path / "event.schema.json").read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
