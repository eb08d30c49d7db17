"""The HTTP listener: /metrics, /healthz, /readyz, the ops API and its OpenAPI document.

The document itself is built in `daemon.openapi`.

The standard library's threading server is enough for a scrape every few seconds and a few op
requests; what it lacks is bounds, added here: a connection cap (one thread per connection),
socket timeouts, a deadline on reading a body, and a body size cap checked before reading.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from daemon import __version__
from daemon.messages import HealthReply
from daemon.openapi import JSON, OPS_PREFIX, ROUTES, openapi_document
from daemon.ops import OpsHandler, error_reply
from daemon.request import EpisodeSummary, ErrorCode, EventsQuery

log = logging.getLogger(__name__)

# A body must arrive within this, whatever the pace of the client: bounds how long a
# trickling client holds a thread, on top of the per-read socket timeout.
BODY_DEADLINE_S = 30.0
# A refused body is read and discarded up to this much, so that closing the socket does not
# reset the connection before the client has read the reply.
DISCARD_MAX_BYTES = 256 * 1024

Check = Callable[[], tuple[bool, dict[str, Any]]]


class HttpServer:
    """The daemon's HTTP listener, serving from a background thread."""

    def __init__(
        self,
        bind: str,
        port: int,
        *,
        registry: CollectorRegistry,
        ops: OpsHandler,
        health: Check,
        ready: Check,
        streams: Callable[[], list[dict[str, Any]]] | None = None,
        events: Callable[[EventsQuery], list[EpisodeSummary]] | None = None,
        token: str | None = None,
        on_request: Callable[[str, int], None] | None = None,
        max_connections: int = 64,
        timeout_s: float = 10.0,
    ) -> None:
        self.bind = bind
        self._port = port
        self.registry = registry
        self.ops = ops
        self.health = health
        self.ready = ready
        self.streams = streams
        self.events = events
        self.token = token
        self.on_request = on_request
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.openapi = json.dumps(
            openapi_document(token is not None, streams is not None, events is not None)
        ).encode()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._server.server_address[1] if self._server is not None else self._port

    def start(self) -> None:
        """Bind and serve in a daemon thread; OSError with one line when the bind fails."""
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        try:
            self._server = _Server(self)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {self.bind}:{self._port}: {exc.strerror or exc}"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="oteo-http"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the listener; requests in flight finish on their own."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog (socketserver's default is 5): a burst of scrapes and probes waits in
    # the kernel instead of being refused; the connection cap below still bounds the threads.
    request_queue_size = 128

    def __init__(self, app: HttpServer) -> None:
        self.app = app
        self._slots = threading.BoundedSemaphore(app.max_connections)
        if ":" in app.bind:
            self.address_family = socket.AF_INET6
        super().__init__((app.bind, app._port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query that can hang for
        # seconds on an edge box without DNS; the name is only used for CGI.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.app.bind
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection: over the cap, refuse at once rather than grow threads.
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server_version = f"oteo/{__version__}"
    # HTTP/1.0: one request per connection, so no idle keep-alive connection holds a thread.
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self.app = cast(_Server, self.server).app
        self._status = 0
        self._label = "other"
        self._unread = 0  # bytes of a request body not read
        self._dispatching = False
        self._counted = False
        super().setup()
        self.connection.settimeout(self.app.timeout_s)  # every read and write, headers included

    # -- plumbing ------------------------------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own refusals (malformed request line, unsupported method) as JSON too.
        error: ErrorCode = "not_found" if code == HTTPStatus.NOT_FOUND else "bad_request"
        text = message or HTTPStatus(code).phrase
        self._reply(code, error_reply(error, text))
        if not self._dispatching:  # refused before routing: still counted
            self._count()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self._dispatching:
            # Counted before the body leaves: a client that reads the reply and then the
            # metric sees its own request.
            self._count()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(
        self, status: int, error: ErrorCode, message: str, op: str | None = None, **headers: str
    ) -> None:
        self._reply(status, error_reply(error, message, op), headers=headers)

    def _dispatch(self, handler: Callable[[str], None]) -> None:
        self._dispatching = True
        path = urlsplit(self.path).path
        try:
            handler(path)
        except Exception:
            log.exception("HTTP %s %s failed", self.command, path[:100])
            if not self._status:
                self._error(500, "internal", "internal error; see the daemon log")
        finally:
            self._discard_unread()
            self._count()

    def _count(self) -> None:
        if self._counted:
            return
        self._counted = True
        if self.app.on_request is not None:
            try:
                self.app.on_request(self._label, self._status or 500)
            except Exception:
                log.exception("on_request callback failed")

    # -- routes --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _get(self, path: str) -> None:
        app = self.app
        if path == "/metrics":
            self._label = path
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(app.registry), content_type)
        elif path in ("/healthz", "/readyz"):
            self._label = path
            self._check(app.health if path == "/healthz" else app.ready)
        elif path == "/openapi.json":
            self._label = path
            self._reply(200, app.openapi)
        elif path == "/":
            self._label = path
            routes = {
                k: v
                for k, v in ROUTES.items()
                if ("streams" not in k or app.streams) and ("events" not in k or app.events)
            }
            index = {"service": "oteo", "version": __version__, "routes": routes}
            self._reply(200, json.dumps(index).encode())
        elif path == "/v1/streams" and app.streams is not None:
            self._label = path
            if self._authorized():
                self._reply(200, json.dumps(app.streams(), default=str).encode())
        elif path == "/v1/events" and app.events is not None:
            self._label = path
            if self._authorized():
                self._list_events(app.events)
        elif path.startswith(OPS_PREFIX):
            self._label = "/v1/ops/{op}"
            if self._authorized():
                self._error(405, "bad_request", f"use POST for {path[:100]}", Allow="POST")
        else:
            self._not_found(path)

    def _post(self, path: str) -> None:
        length = self._content_length()
        self._unread = length or 0
        if not path.startswith(OPS_PREFIX):
            self._not_found(path)
            return
        self._label = "/v1/ops/{op}"
        op = path[len(OPS_PREFIX) :]
        if not self._authorized():
            return
        if length is None:
            self._error(411, "bad_request", "Content-Length is required (no chunked bodies)", op)
            return
        limit = self.app.ops.max_request_bytes
        if length > limit:
            self._error(413, "too_large", f"request of {length} bytes exceeds {limit}", op)
            return
        body = self._read_body(length)
        if body is not None:
            self._reply(*self.app.ops.handle(op, body))

    def _list_events(self, events: Callable[[EventsQuery], list[EpisodeSummary]]) -> None:
        try:
            query = EventsQuery.from_query_string(urlsplit(self.path).query)
        except ValueError as exc:
            self._error(400, "bad_request", str(exc)[:300])
            return
        body = json.dumps([e.model_dump(mode="json") for e in events(query)]).encode()
        self._reply(200, body)

    def _not_found(self, path: str) -> None:
        if path.startswith("/v1/") and not self._authorized():
            return  # without the token, do not tell which /v1 paths exist
        self._error(404, "not_found", f"no route {self.command} {path[:100]}; see GET /")

    def _check(self, check: Check) -> None:
        try:
            ok, detail = check()
        except Exception as exc:
            log.exception("%s check failed", self._label)
            ok, detail = False, {"error": type(exc).__name__}
        body = HealthReply(ok=ok, detail=detail).to_json()
        self._reply(200 if ok else 503, body)

    def _authorized(self) -> bool:
        token = self.app.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            return True
        self._error(
            401, "unauthorized", "a bearer token is required", **{"WWW-Authenticate": "Bearer"}
        )
        return False

    # -- request bodies ------------------------------------------------------------------------

    def _content_length(self) -> int | None:
        if "Transfer-Encoding" in self.headers:
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None (and a reply sent) when it does not arrive in time."""
        deadline = time.monotonic() + BODY_DEADLINE_S
        parts: list[bytes] = []
        try:
            while self._unread > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(self._unread, 65536))
                if not chunk:
                    raise TimeoutError  # the client closed its side early
                parts.append(chunk)
                self._unread -= len(chunk)
        except TimeoutError:
            self._unread = 0  # a slow client gets no more of our time
            self._error(408, "bad_request", "the request body did not arrive in full, in time")
            return None
        return b"".join(parts)

    def _discard_unread(self) -> None:
        """Read and drop a little of an unread body so the client can read our reply."""
        if self._unread <= 0:
            return
        try:
            self.wfile.flush()
            self.connection.settimeout(1.0)
            left = min(self._unread, DISCARD_MAX_BYTES)
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self._unread = 0
