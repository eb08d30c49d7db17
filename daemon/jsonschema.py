"""JSON Schemas of every contract, generated from the pydantic models and committed.

`python -m daemon.jsonschema daemon/schema` regenerates them; a unit test fails when the
committed files drift from the models. Inputs are described as accepted (validation mode),
outputs as written (serialization mode).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from daemon import messages, reading, request
from daemon.config import Config
from daemon.manifest import Manifest

Mode = Literal["validation", "serialization"]

CONTRACTS: dict[str, tuple[type[BaseModel], Mode]] = {
    "manifest": (Manifest, "validation"),
    "config": (Config, "validation"),
    "reading": (reading.ReadingPayload, "validation"),
    "channel_reading": (reading.ChannelPayload, "validation"),
    "op_request": (request.OpRequest, "validation"),
    "event": (messages.Event, "serialization"),
    "state": (messages.StreamState, "serialization"),
    "status": (messages.Status, "serialization"),
    "window_score": (messages.WindowScore, "serialization"),
    "denoise_reply": (request.DenoiseReply, "serialization"),
    "encode_reply": (request.EncodeReply, "serialization"),
    "hash_reply": (request.HashReply, "serialization"),
    "score_reply": (request.ScoreReply, "serialization"),
    "error_reply": (request.ErrorReply, "serialization"),
    "mute_request": (request.MuteRequest, "validation"),
    "unmute_request": (request.UnmuteRequest, "validation"),
    "sensitivity_request": (request.SensitivityRequest, "validation"),
    "control_reply": (request.ControlReply, "serialization"),
    "similar_request": (request.SimilarRequest, "validation"),
    "similar_reply": (request.SimilarReply, "serialization"),
    "label_request": (request.LabelRequest, "validation"),
    "label_reply": (request.LabelReply, "serialization"),
    "health_reply": (messages.HealthReply, "serialization"),
}


def generate() -> dict[str, dict[str, Any]]:
    """Every contract's JSON Schema, by name."""
    return {name: model.model_json_schema(mode=mode) for name, (model, mode) in CONTRACTS.items()}


def render(schema: dict[str, Any]) -> str:
    """The committed text of a schema: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    """Write `<name>.schema.json` for every contract into `directory`; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in generate().items():
        path = directory / f"{name}.schema.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m daemon.jsonschema DIRECTORY")
    for written_path in write(Path(sys.argv[1])):
        print(written_path)
