"""The HTTP listener on a real socket: metrics, health, the ops API, limits, auth, OpenAPI."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import wait_until
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from daemon.http import HttpServer
from daemon.messages import HealthReply
from daemon.model import Model
from daemon.openapi import PATH_LABELS
from daemon.ops import CONTROL_OPS, STATELESS_OPS, OpsHandler
from daemon.request import ControlReply, ErrorReply, MuteRequest, OpRequest, ScoreReply

TOKEN = "s3cret-token"
MAX_BODY = 64_000


@dataclass
class Daemon:
    """What the HTTP server is wired to, with switches for the tests."""

    model: Model
    healthy: bool = True
    ready: bool = True
    requests: list[tuple[str, int]] = field(default_factory=list)
    controls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def control(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        self.controls.append((op, args))
        return 200, ControlReply(op="mute", id=args["id"], stream=args["stream"], ok=True).to_json()

    def server(self, **kwargs: Any) -> HttpServer:
        registry = CollectorRegistry()
        Counter("oteo_test_events_total", "Test counter.", registry=registry).inc(3)
        ops = OpsHandler(lambda: self.model, control=self.control, max_request_bytes=MAX_BODY)
        return HttpServer(
            "127.0.0.1",
            0,
            registry=registry,
            ops=ops,
            health=lambda: (self.healthy, {"main_loop": "alive" if self.healthy else "stuck"}),
            ready=lambda: (self.ready, {"mqtt": "connected" if self.ready else "down"}),
            streams=lambda: [{"stream": "pump-1", "state": "normal"}],
            on_request=lambda path, status: self.requests.append((path, status)),
            **kwargs,
        )


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Model:
    return Model.load(tiny_model_path)


@pytest.fixture
def daemon(model: Model) -> Daemon:
    return Daemon(model)


@pytest.fixture
def base(daemon: Daemon) -> Iterator[str]:
    server = daemon.server()
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def guarded(daemon: Daemon) -> Iterator[str]:
    server = daemon.server(token=TOKEN)
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def call(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def op_body(windows: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"windows": windows.tolist(), **extra}).encode()


def test_metrics_parse_as_prometheus_text(base: str) -> None:
    status, headers, body = call(f"{base}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["oteo_test_events"].samples[0].value == 3


def test_health_and_ready_follow_the_callbacks(base: str, daemon: Daemon) -> None:
    for path in ("healthz", "readyz"):
        status, _, body = call(f"{base}/{path}")
        assert status == 200
        assert HealthReply.model_validate_json(body).ok
    daemon.ready = False
    status, _, body = call(f"{base}/readyz")
    assert status == 503
    assert HealthReply.model_validate_json(body).detail == {"mqtt": "down"}
    assert call(f"{base}/healthz")[0] == 200
    daemon.healthy = False
    status, _, body = call(f"{base}/healthz")
    assert (status, json.loads(body)["detail"]) == (503, {"main_loop": "stuck"})


def test_score_round_trip(base: str, model: Model, tiny_windows: np.ndarray) -> None:
    windows = tiny_windows[:4]
    status, headers, body = call(f"{base}/v1/ops/score", op_body(windows, id="r-1"))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    reply = ScoreReply.model_validate_json(body)
    assert reply.id == "r-1"
    np.testing.assert_array_equal(np.asarray(reply.score), model.run(windows).score)


def test_bad_op_request_gets_an_error_reply(base: str, tiny_windows: np.ndarray) -> None:
    status, _, body = call(f"{base}/v1/ops/score", op_body(tiny_windows[:2, :10], id="x"))
    error = ErrorReply.model_validate_json(body)
    assert (status, error.error, error.id) == (400, "bad_request", "x")
    assert "got [2, 10, 8]" in error.message
    status, _, body = call(f"{base}/v1/ops/nope", op_body(tiny_windows[:1]))
    assert (status, json.loads(body)["error"]) == (404, "unknown_op")


def test_control_op_reaches_the_main_loop(base: str, daemon: Daemon) -> None:
    request = {"stream": "pump-1", "duration_s": 60, "id": "m1"}
    status, _, body = call(f"{base}/v1/ops/mute", json.dumps(request).encode())
    assert status == 200
    assert ControlReply.model_validate_json(body).id == "m1"
    assert daemon.controls[0][0] == "mute"


def test_oversize_body_is_413(base: str) -> None:
    status, _, body = call(f"{base}/v1/ops/score", b"[" + b" " * (MAX_BODY + 10) + b"]")
    assert (status, json.loads(body)["error"]) == (413, "too_large")


def test_post_without_content_length_is_refused(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    # The whole request in one write: sent piecewise (http.client), the 411 could close the
    # connection before the body went out, and the client would see a broken pipe instead.
    request = (
        b"POST /v1/ops/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 411
        assert json.loads(response.read())["error"] == "bad_request"


def test_token_is_required_on_v1_routes(guarded: str, tiny_windows: np.ndarray) -> None:
    url = f"{guarded}/v1/ops/score"
    data = op_body(tiny_windows[:2])
    status, headers, body = call(url, data)
    assert (status, json.loads(body)["error"]) == (401, "unauthorized")
    assert headers["WWW-Authenticate"] == "Bearer"
    assert call(url, data, {"Authorization": "Bearer wrong"})[0] == 401
    assert call(url, data, {"Authorization": TOKEN})[0] == 401  # scheme missing
    assert call(url, data, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert call(f"{guarded}/v1/streams")[0] == 401
    assert call(f"{guarded}/v1/nothing-here")[0] == 401  # no hint of which /v1 paths exist
    for open_path in ("/metrics", "/healthz", "/readyz", "/openapi.json"):
        assert call(f"{guarded}{open_path}")[0] == 200, open_path


def test_streams_lists_what_the_callback_gives(base: str) -> None:
    status, _, body = call(f"{base}/v1/streams")
    assert (status, json.loads(body)) == (200, [{"stream": "pump-1", "state": "normal"}])


def test_openapi_is_generated_from_the_models(guarded: str) -> None:
    status, _, body = call(f"{guarded}/openapi.json")
    assert status == 200
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.1")
    for op in STATELESS_OPS + CONTROL_OPS:
        post = doc["paths"][f"/v1/ops/{op}"]["post"]
        assert {"200", "400", "401", "413", "503"} <= set(post["responses"])
        assert post["security"] == [{"bearer": []}]
    assert "409" in doc["paths"]["/v1/ops/hash"]["post"]["responses"]
    assert {"/healthz", "/readyz", "/metrics", "/v1/streams"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    for model, mode in [
        (OpRequest, "validation"),
        (MuteRequest, "validation"),
        (ScoreReply, "serialization"),
        (ErrorReply, "serialization"),
        (HealthReply, "serialization"),
    ]:
        generated = model.model_json_schema(mode=mode)
        assert schemas[model.__name__]["properties"].keys() == generated["properties"].keys()
    refs = [ref for ref in _refs(doc) if ref.startswith("#/components/schemas/")]
    assert refs
    assert all(ref.rsplit("/", 1)[-1] in schemas for ref in refs)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_unknown_path_is_404_json(base: str, daemon: Daemon) -> None:
    status, headers, body = call(f"{base}/nope/../etc?x=1")
    assert (status, headers["Content-Type"]) == (404, "application/json")
    assert json.loads(body)["error"] == "not_found"
    assert daemon.requests[-1] == ("other", 404)


def test_index_lists_the_routes(base: str) -> None:
    status, _, body = call(f"{base}/")
    assert status == 200
    assert "POST /v1/ops/{op}" in json.loads(body)["routes"]


def test_requests_are_counted_by_fixed_path_labels(base: str, daemon: Daemon) -> None:
    for path in ("/metrics", "/healthz", "/v1/ops/score", "/random/path", "/v1/ops/x/y"):
        call(f"{base}{path}")
    assert {label for label, _ in daemon.requests} <= set(PATH_LABELS)
    assert ("/v1/ops/{op}", 405) in daemon.requests  # GET on an op


def test_port_in_use_is_a_clear_error(daemon: Daemon) -> None:
    first = daemon.server()
    first.start()
    try:
        second = HttpServer(
            "127.0.0.1",
            first.port,
            registry=CollectorRegistry(),
            ops=OpsHandler(lambda: daemon.model),
            health=lambda: (True, {}),
            ready=lambda: (True, {}),
        )
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            second.start()
    finally:
        first.stop()


def test_slow_client_is_disconnected(daemon: Daemon) -> None:
    server = daemon.server(timeout_s=0.5)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end
            start = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - start < 5
    finally:
        server.stop()


def test_connections_over_the_cap_are_refused(daemon: Daemon) -> None:
    server = daemon.server(max_connections=1, timeout_s=5)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
            # Once the server has taken the idle connection, it holds the only slot.
            assert wait_until(lambda: call(url)[0] == 503, 5), "a connection over the cap served"
            idle.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert idle.recv(100).startswith(b"HTTP/1.0 200")
        assert wait_until(lambda: call(url)[0] == 200, 5), "the slot not freed after the close"
    finally:
        server.stop()
