"""The HTTP API described: its routes and the OpenAPI 3.1 document (schemas from the models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from daemon import __version__
from daemon.messages import HealthReply
from daemon.ops import (
    ALL_OPS,
    CONTROL_OPS,
    CONTROL_REQUESTS,
    MEMORY_OPS,
    MEMORY_REQUESTS,
    REPLY_MODELS,
    STATELESS_OPS,
)
from daemon.request import ControlReply, EpisodeSummary, ErrorReply, EventsQuery, OpRequest

JSON = "application/json"
OPS_PREFIX = "/v1/ops/"
# Labels of `on_request`: a fixed set, so a scan of random paths cannot grow the metric.
PATH_LABELS = (
    "/",
    "/metrics",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/v1/ops/{op}",
    "/v1/streams",
    "/v1/events",
    "other",
)
ROUTES = {
    "GET /": "this index",
    "GET /metrics": "Prometheus metrics",
    "GET /healthz": "liveness: 200 when the daemon works, 503 with what failed",
    "GET /readyz": "readiness: 200 when the model is loaded and MQTT is connected",
    "GET /openapi.json": "OpenAPI 3.1 description of this API",
    "POST /v1/ops/{op}": "operations: " + ", ".join(ALL_OPS),
    "GET /v1/streams": "the streams the daemon tracks",
    "GET /v1/events": "alarm episodes and their labels (?label=false_alarm|confirmed|none"
    "&stream=…&limit=…)",
}


Ref = Any  # a JSON Schema `$ref` object


def openapi_document(
    token_required: bool, with_streams: bool = True, with_events: bool = True
) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the HTTP API, its schemas generated from the models."""
    ops: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
        **{op: (OpRequest, REPLY_MODELS[op]) for op in STATELESS_OPS},
        **{op: (CONTROL_REQUESTS[op], ControlReply) for op in CONTROL_OPS},
        **{op: (MEMORY_REQUESTS[op], REPLY_MODELS[op]) for op in MEMORY_OPS},
    }
    schemas = _Schemas(ops)
    security: list[dict[str, list[str]]] = [{"bearer": []}] if token_required else []
    paths = {
        f"{OPS_PREFIX}{op}": _op_path(op, request, reply, schemas, security)
        for op, (request, reply) in ops.items()
    }
    paths.update(_plain_paths(schemas, security, with_streams))
    if with_events:
        paths["/v1/events"] = _events_path(schemas, security)
    return {
        "openapi": "3.1.0",
        "info": {"title": "oteo", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas.definitions,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


class _Schemas:
    """JSON Schemas of every request (as accepted) and reply (as written), shared by reference."""

    def __init__(self, ops: dict[str, tuple[type[BaseModel], type[BaseModel]]]) -> None:
        requests: dict[type[BaseModel], None] = dict.fromkeys(r for r, _ in ops.values())
        replies: dict[type[BaseModel], None] = dict.fromkeys(
            [*(r for _, r in ops.values()), ErrorReply, HealthReply, EpisodeSummary]
        )
        self._keys, top = models_json_schema(
            [(m, "validation") for m in requests] + [(m, "serialization") for m in replies],
            ref_template="#/components/schemas/{model}",
        )
        self.definitions: dict[str, Any] = top.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> Ref:
        return dict(self._keys[(model, mode)])

    def body(self, model: type[BaseModel], description: str) -> dict[str, Any]:
        """A response whose JSON body is `model` as written."""
        return {
            "description": description,
            "content": {JSON: {"schema": self.ref(model, "serialization")}},
        }


def _op_path(
    op: str,
    request: type[BaseModel],
    reply: type[BaseModel],
    schemas: _Schemas,
    security: list[dict[str, list[str]]],
) -> dict[str, Any]:
    errors = {
        "400": schemas.body(ErrorReply, "invalid request; `message` says what is wrong"),
        "404": schemas.body(ErrorReply, "unknown op, or (control ops) unknown stream"),
        "413": schemas.body(ErrorReply, "request body too large"),
        "500": schemas.body(ErrorReply, "internal error"),
        "503": schemas.body(ErrorReply, "busy, or the op is not available"),
    }
    if security:
        errors["401"] = schemas.body(ErrorReply, "missing or wrong bearer token")
    responses = {"200": schemas.body(reply, f"{op} reply"), **errors}
    if op == "hash":
        responses["409"] = schemas.body(ErrorReply, "the model is not trained for hashing")
    if op in MEMORY_OPS:
        responses["404"] = schemas.body(ErrorReply, "unknown op, event id, or recorded window")
        responses["503"] = schemas.body(
            ErrorReply, "busy, or no memory of windows (no recorded stream, model cannot hash)"
        )
    summary = (reply if op in STATELESS_OPS else request).__doc__ or op
    return {
        "post": {
            "operationId": op,
            "summary": summary.strip(),
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": schemas.ref(request, "validation")}},
            },
            "responses": responses,
            "security": security,
        }
    }


def _plain_paths(
    schemas: _Schemas, security: list[dict[str, list[str]]], with_streams: bool
) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, summary in (("/healthz", "liveness"), ("/readyz", "readiness")):
        checks = {
            "200": schemas.body(HealthReply, "ok"),
            "503": schemas.body(HealthReply, "not ok: see detail"),
        }
        paths[path] = {"get": {"summary": summary, "responses": checks}}
    text = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    metrics = {"200": {"description": "Prometheus text format", **text}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "responses": metrics}}
    if with_streams:
        listing = {"schema": {"type": "array", "items": {"type": "object"}}}
        streams = {"200": {"description": "one object per stream", "content": {JSON: listing}}}
        paths["/v1/streams"] = {
            "get": {"summary": "the tracked streams", "responses": streams, "security": security}
        }
    return paths


def _events_path(schemas: _Schemas, security: list[dict[str, list[str]]]) -> dict[str, Any]:
    fields = EventsQuery.model_json_schema()["properties"]
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": spec.get("description", ""),
            "schema": {k: v for k, v in spec.items() if k not in ("description", "title")},
        }
        for name, spec in fields.items()
    ]
    listing = {"type": "array", "items": schemas.ref(EpisodeSummary, "serialization")}
    responses = {
        "200": {
            "description": "alarm episodes, newest first",
            "content": {JSON: {"schema": listing}},
        },
        "400": schemas.body(ErrorReply, "a query parameter is not valid"),
    }
    return {
        "get": {
            "summary": "alarm episodes from the event journal, with their labels",
            "parameters": parameters,
            "responses": responses,
            "security": security,
        }
    }
