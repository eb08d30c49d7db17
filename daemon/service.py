"""The running daemon: wires model, engine, MQTT link, HTTP server and systemd together.

Threads: the MQTT network thread (parses, validates and queues readings; the only caller of
paho), the HTTP server's threads (metrics, health, operations), a small pool for MQTT operation
requests, and the main loop (this module's `Daemon.run`), the one owner of all stream state.
Signal handlers only set flags that the main loop reads.
"""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import prometheus_client

from daemon.config import Config, ConfigError, load_config
from daemon.engine import Engine, Work
from daemon.http import HttpServer
from daemon.messages import DROP_REASONS, ControlReply, PayloadError, ReadingParser, format_ts
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.mqtt import Incoming, LinkState, MqttLink, Outgoing
from daemon.notify import Notifier
from daemon.ops import OpsHandler, mqtt_reply_target
from daemon.outbox import Outbox, OutboxError
from daemon.recorder import Recorder
from daemon.startup import REFUSALS, check_startup

log = logging.getLogger(__name__)

TICK_S = 1.0
MODEL_POLL_S = 2.0
DRAIN_SLICE_S = 0.25  # longest the loop handles readings before it ticks
MAX_PENDING_OPS = 256  # MQTT ops requests queued for the two ops workers
CONTROL_TIMEOUT_S = 2.0
MAX_STREAM_ID = 128


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line naming what and how to fix it."""


@dataclass
class _Control:
    op: str
    args: dict[str, Any]
    reply: Future[Any] = field(default_factory=Future)


class Daemon:
    """`Daemon(cfg).run()` runs until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self._config_path = config_path
        self._overrides = overrides or {}
        self._stop = threading.Event()
        self._reload_requested = False
        self._accepting = True
        # Held while a message is checked and queued, so shutdown cannot slip between the two
        # (a reading acknowledged but queued after the final drain would be lost).
        self._intake = threading.Lock()
        self._controls: queue.SimpleQueue[_Control] = queue.SimpleQueue()
        self.notifier = Notifier()
        # `_created` series double the exposition and nobody graphs them (process-wide switch).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.metrics = Metrics(
            max_stream_labels=cfg.metrics.max_stream_labels, drop_reasons=DROP_REASONS
        )
        try:
            self.model = check_startup(cfg).model  # the checks `oteo check-config` runs
        except REFUSALS as exc:
            raise StartupError(str(exc)) from exc
        self._model_stamp = _stamp(cfg.model.path)
        # queue.Queue, not SimpleQueue: with SimpleQueue the main loop was seen blocked inside
        # get(timeout=0.05) for over 10 s after SIGHUP reloads (py-spy; about one run in three
        # of the bad-model reload test), never with Queue. The bound counts readings, not messages
        # (a batch payload holds many), so memory stays bounded; each counter has one writer:
        # the network thread the first, the main loop the second.
        self.queue: queue.Queue[Work] = queue.Queue()
        self._readings_queued = 0
        self._readings_taken = 0
        self.engine = Engine(self.model, cfg, self._publish, self.metrics)
        self._parser = self._new_parser()
        self._ok_messages = self.metrics.messages_total.labels(result="ok")
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self.outbox = Outbox(
                cfg.state_dir / "outbox.sqlite3",
                max_events=cfg.outbox.max_events,
                max_bytes=cfg.outbox.max_bytes,
            )
        except (OSError, OutboxError) as exc:
            raise StartupError(
                f"state_dir: cannot use {cfg.state_dir} for the outbox ({exc}); "
                "make it writable or set state_dir"
            ) from exc
        self.recorder: Recorder | None = None
        if cfg.record.streams:
            try:
                self.recorder = Recorder(cfg.record, cfg.state_dir, self.metrics)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(
                    f"record: cannot use {cfg.state_dir} for the recording ({exc}); "
                    "make it writable or set state_dir"
                ) from exc
            self.recorder.use_layout(
                self.model.manifest.channels, self.model.manifest.sample_period_s
            )
        self.ops = OpsHandler(
            lambda: self.engine.model,
            control=self.control,
            observe=lambda op, result, s: self._observe_op(op, result, s),
        )
        self._ops_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="oteo-ops")
        self._ops_slots = threading.BoundedSemaphore(MAX_PENDING_OPS)
        self._last_ok = time.monotonic()
        self._loop_alive = time.monotonic()
        try:
            token = cfg.http.token()
        except ConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.http = HttpServer(
            cfg.http.bind,
            cfg.http.port,
            registry=self.metrics.registry,
            ops=self.ops,
            health=self._health,
            ready=self._ready,
            streams=self._streams_snapshot,
            token=token,
            on_request=lambda path, code: self.metrics.http_requests_total.labels(
                path=path, code=str(code)
            ).inc(),
        )
        topics = self.engine.topics
        qos = cfg.mqtt.qos
        subscriptions = [(f"{topics.input_prefix}/+/data", qos), (f"{topics.ops}/+", 1)]
        if cfg.topics.per_channel:
            subscriptions.append((f"{topics.input_prefix}/+/ch/+", qos))
        self.link = MqttLink(
            cfg.mqtt,
            client_id=f"oteo-{cfg.instance}",
            subscriptions=subscriptions,
            status_topic=topics.status,
            online_payload=self.engine.status("online"),
            offline_payload=self.engine.status("offline"),
            on_message=self._on_message,
            outbox=self.outbox,
            on_state=self._on_link_state,
        )
        self._mirrored: dict[str, int] = {}
        self._depth_peak = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        self._install_signals()
        try:
            self.http.start()
        except OSError as exc:
            raise StartupError(
                f"http: cannot listen on {self.cfg.http.bind}:{self.cfg.http.port}: {exc}"
            ) from exc
        m = self.model.manifest
        log.info(
            "model %s %s (sha256 %s), %d channels, window %d; http on %s:%d",
            m.name,
            m.version,
            self.model.sha256,
            len(m.channels),
            m.window,
            self.cfg.http.bind,
            self.http.port,
        )
        self.notifier.ready(f"model {m.name} {m.version}; waiting for MQTT")
        self.link.start()
        next_tick = next_poll = next_dog = next_record = time.monotonic()
        while not self._stop.is_set():
            self._drain(timeout_s=0.05)
            now = time.monotonic()
            self._loop_alive = now
            self._run_controls()
            if self._reload_requested:
                self._reload_requested = False
                self._reload("SIGHUP", reread_config=True)
            if now >= next_tick:
                next_tick = now + TICK_S
                self.engine.tick()
                self._update_gauges(now)
            if self.recorder is not None and now >= next_record:
                next_record = now + self.cfg.record.flush_s
                self.recorder.flush(self.engine.streams)
            if now >= next_poll:
                next_poll = now + MODEL_POLL_S
                self._check_model_file()
            interval = self.notifier.watchdog_interval_s
            if interval is not None and now >= next_dog:
                next_dog = now + interval
                self.notifier.watchdog()
        return self._shutdown()

    def _shutdown(self) -> int:
        log.info("stopping: no new readings; finishing queued windows and flushing events")
        self.notifier.stopping()
        with self._intake:
            self._accepting = False  # further messages stay unacknowledged at the broker
        self._drain(timeout_s=0.0, until_empty=True)
        self._run_controls()
        if self.recorder is not None:
            self.recorder.flush(self.engine.streams)
            self.recorder.close()
        acked = self.link.stop(timeout_s=10.0)
        if not acked:
            log.warning(
                "%d events not acknowledged; they stay in the outbox for the next start",
                len(self.outbox),
            )
        self.http.stop()
        self._ops_pool.shutdown(wait=False, cancel_futures=True)
        self.outbox.close()
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # tests drive the daemon from another thread and call stop()

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # -- main loop ---------------------------------------------------------------------------

    def _drain(self, timeout_s: float, until_empty: bool = False) -> None:
        """Handle queued readings; score when the queue runs dry or a batch is full."""
        try:
            work = self.queue.get(timeout=timeout_s) if timeout_s > 0 else self.queue.get_nowait()
        except queue.Empty:
            self.engine.score_pending()
            return
        # The gauge shows the deepest point since its last refresh: sampled only when idle,
        # it would read 0 just after every drain.
        self._depth_peak = max(self._depth_peak, self.queue.qsize() + 1)
        deadline = time.monotonic() + DRAIN_SLICE_S
        handled = 0
        while True:
            self._readings_taken += work.size
            if self.recorder is not None:
                self.recorder.record(work)
            self.engine.handle(work)
            handled += 1
            if handled % 64 == 0:
                self.link.wake()  # room in the queue: let held-back QoS 1 messages in
                if not until_empty and time.monotonic() >= deadline:
                    # Under sustained load the queue never runs dry: return anyway so the loop
                    # keeps ticking (stale streams, alarm timers, gauges, the watchdog).
                    self._depth_peak = max(self._depth_peak, self.queue.qsize())
                    self.engine.score_pending()
                    return
            try:
                work = self.queue.get_nowait()
            except queue.Empty:
                self.engine.score_pending()
                self.link.wake()
                if not until_empty or self.queue.empty():
                    return
                work = self.queue.get_nowait()

    def _update_gauges(self, now: float) -> None:
        m = self.metrics
        m.queue_depth_messages.set(max(self._depth_peak, self.queue.qsize()))
        self._depth_peak = 0
        m.mqtt_connected.set(1 if self.link.connected else 0)
        # The outbox belongs to the network thread; its size and byte count are cached ints.
        m.outbox_events.set(len(self.outbox))
        m.outbox_bytes.set(self.outbox.bytes)
        c = self.link.counters
        self._mirror(m.outbox_dropped_total, "outbox_dropped", self.outbox.dropped)
        self._mirror(m.outbox_errors_total, "outbox_errors", c.outbox_errors)
        self._mirror(m.mqtt_publish_acks_total, "acked", c.acked)
        self._mirror(m.mqtt_reconnects_total, "reconnects", c.reconnects)
        # Dropped inside the link, before the intake saw them: counted like the intake's own.
        qos0_full = m.messages_total.labels(result="queue_full_qos0")
        self._mirror(qos0_full, "link_qos0", c.dropped_qos0)
        bad_topic = m.messages_total.labels(result="unknown_stream_topic")
        self._mirror(bad_topic, "link_bad_topics", c.bad_topics)
        for kind, count in list(c.connect_failures.items()):
            self._mirror(m.mqtt_connect_failures_total.labels(reason=kind), f"cf_{kind}", count)
        incomplete = sum(s.aligner.incomplete for s in self.engine.streams.values() if s.aligner)
        self._mirror(m.aligner_incomplete_total, "incomplete", incomplete)
        stale_s = self.cfg.ingest.stale_s(self.engine.model.manifest.sample_period_s)
        m.no_data.set(1 if now - self._last_ok > stale_s else 0)

    # -- network thread ----------------------------------------------------------------------

    def _on_message(self, msg: Incoming) -> bool:
        """Parse, validate and queue one message (runs in the MQTT network thread)."""
        with self._intake:
            if not self._accepting:
                return False
            return self._take(msg)

    def _take(self, msg: Incoming) -> bool:
        topics = self.engine.topics
        if msg.topic.startswith(topics.ops + "/"):
            # A bounded backlog: requests beyond it are answered by nobody (the caller times
            # out) and counted, rather than queued without limit behind slow ones.
            if not self._ops_slots.acquire(blocking=False):
                op = _op_label(msg.topic.rsplit("/", 1)[-1])
                self.metrics.ops_total.labels(op=op, result="busy").inc()
                return True
            self._ops_pool.submit(self._mqtt_op, msg)
            return True
        parts = msg.topic.split("/")
        prefix = topics.input_prefix.count("/") + 1
        rest = parts[prefix:]
        stream = rest[0] if rest else ""
        if not stream or len(stream) > MAX_STREAM_ID:
            self.metrics.messages_total.labels(result="unknown_stream_topic").inc()
            return True
        try:
            if len(rest) == 2 and rest[1] == "data":
                readings = self._parser.parse(msg.payload)
                horizon = time.time() + self.cfg.ingest.max_future_s
                if any(r.ts > horizon for r in readings):
                    raise PayloadError("bad_timestamp", "a timestamp is too far in the future")
                work = Work(stream, readings, arrival=time.monotonic(), size=len(readings))
            elif len(rest) == 3 and rest[1] == "ch":
                index = self._channel_index.get(rest[2])
                if index is None:
                    raise PayloadError("unknown_channel", f"unknown channel {rest[2]!r}")
                sample = self._parser.parse_channel_sample(msg.payload)
                if sample.ts is not None and sample.ts > time.time() + self.cfg.ingest.max_future_s:
                    raise PayloadError("bad_timestamp", "the timestamp is too far in the future")
                work = Work(stream, None, index, sample, arrival=time.monotonic())
            else:
                self.metrics.messages_total.labels(result="unknown_stream_topic").inc()
                return True
        except PayloadError as exc:
            self.metrics.messages_total.labels(result=exc.reason).inc()
            log.debug("dropped message on %s: %s", msg.topic, exc)
            return True
        depth = self._readings_queued - self._readings_taken
        # An empty queue takes any message, so a batch larger than the bound still gets in.
        if depth + work.size > self.cfg.ingest.queue_size and not self.queue.empty():
            if msg.qos == 0:
                self.metrics.messages_total.labels(result="queue_full_qos0").inc()
                return True
            return False  # not acknowledged: the broker keeps it until there is room
        self._readings_queued += work.size
        self.queue.put(work)
        self._ok_messages.inc()
        self.metrics.last_message_timestamp_seconds.set(time.time())
        self._last_ok = work.arrival
        return True

    def _mirror(self, counter: Any, key: str, total: int) -> None:
        """Advance a Prometheus counter to a running total kept elsewhere."""
        last = self._mirrored.get(key, 0)
        if total > last:
            counter.inc(total - last)
        self._mirrored[key] = total

    def _on_link_state(self, state: LinkState, reason: str) -> None:
        if state is LinkState.CONNECTED:
            self.notifier.send(f"STATUS=connected to {self.cfg.mqtt.host}:{self.cfg.mqtt.port}")
            # Retained states again: non-durable publishes made while disconnected were dropped.
            self._controls.put(_Control("_republish", {}))

    def _publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, durable: bool
    ) -> None:
        self.link.publish(Outgoing(topic, payload, qos=qos, retain=retain, durable=durable))
        self.metrics.mqtt_published_total.labels(kind=topic.rsplit("/", 1)[-1]).inc()

    # -- operations and controls -------------------------------------------------------------

    def _mqtt_op(self, msg: Incoming) -> None:
        try:
            self._answer_op(msg)
        finally:
            self._ops_slots.release()

    def _answer_op(self, msg: Incoming) -> None:
        op = msg.topic.rsplit("/", 1)[-1]
        _status, reply = self.ops.handle(op, msg.payload)
        reply_to = None
        if not self.link.protocol_v5:
            reply_to = _reply_to_field(msg.payload)
        target = mqtt_reply_target(self.engine.topics.ops, msg.topic, msg.properties, reply_to)
        if target is None:
            self.metrics.ops_total.labels(op=_op_label(op), result="no_reply_topic").inc()
            return
        self.link.publish(
            Outgoing(target.topic, reply, qos=1, correlation_data=target.correlation_data)
        )
        self.metrics.mqtt_published_total.labels(kind="reply").inc()

    def _observe_op(self, op: str, result: str, seconds: float) -> None:
        self.metrics.ops_total.labels(op=_op_label(op), result=result).inc()
        self.metrics.ops_duration_seconds.labels(op=_op_label(op)).observe(seconds)

    def control(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """Run a control op in the main loop (called from HTTP or ops threads)."""
        item = _Control(op, args)
        self._controls.put(item)
        try:
            result: tuple[int, bytes] = item.reply.result(timeout=CONTROL_TIMEOUT_S)
        except FutureTimeout:
            return 503, b'{"error": "busy", "message": "main loop did not answer in time"}'
        return result

    def _run_controls(self) -> None:
        while True:
            try:
                item = self._controls.get_nowait()
            except queue.Empty:
                return
            if item.op == "_republish":
                self.engine.republish_states()
                continue
            if item.op == "_describe":
                item.reply.set_result(self.engine.describe())
                continue
            try:
                item.reply.set_result(self._apply_control(item.op, item.args))
            except Exception as exc:  # reply, never kill the main loop
                log.exception("control %s failed", item.op)
                item.reply.set_result(
                    (500, f'{{"error": "internal", "message": "{type(exc).__name__}"}}'.encode())
                )

    def _apply_control(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        stream_id = str(args["stream"])
        if op == "mute":
            stream = self.engine.mute(stream_id, float(args["duration_s"]))
            until = time.time() + float(args["duration_s"])
        elif op == "unmute":
            stream = self.engine.unmute(stream_id)
            until = None
        elif op == "sensitivity":
            stream = self.engine.set_sensitivity(stream_id, float(args["factor"]))
            until = None
        else:
            return 404, b'{"error": "bad_request", "message": "unknown control op"}'
        reply = ControlReply(
            op=op,
            id=args.get("id"),
            stream=stream_id,
            ok=True,
            state=stream.state,
            until=format_ts(until) if until else None,
        )
        return 200, reply.to_json()

    def _streams_snapshot(self) -> list[dict[str, Any]]:
        # Stream state belongs to the main loop; reading it from an HTTP thread would race.
        item = _Control("_describe", {})
        self._controls.put(item)
        try:
            result: list[dict[str, Any]] = item.reply.result(timeout=CONTROL_TIMEOUT_S)
        except FutureTimeout:
            return []
        return result

    # -- health ------------------------------------------------------------------------------

    def _health(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._loop_alive
        return age < 10.0, {"main_loop_age_s": round(age, 3)}

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        ok, info = self._health()
        connected = self.link.connected
        return ok and connected, {
            **info,
            "mqtt_connected": connected,
            "model": self.engine.model_ref.model_dump(),
        }

    # -- reload ------------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._reload_requested = True

    def _check_model_file(self) -> None:
        stamp = _stamp(self.cfg.model.path)
        if stamp is not None and stamp != self._model_stamp:
            self._model_stamp = stamp
            self._reload("model file changed", reread_config=False)

    def _reload(self, why: str, *, reread_config: bool) -> None:
        self.notifier.reloading()
        cfg = self.cfg
        try:
            if reread_config and self._config_path is not None:
                cfg = load_config(self._config_path, self._overrides)
            model = check_startup(cfg).model
        except REFUSALS as exc:
            log.error("reload (%s) failed, the current model keeps serving: %s", why, exc)
            self.metrics.model_reloads_total.labels(result="failed").inc()
            self.notifier.send("READY=1", f"STATUS=reload failed: {str(exc)[:200]}")
            return
        if len(model.manifest.channels) != len(self.model.manifest.channels) or (
            model.manifest.channels != self.model.manifest.channels
        ):
            self._parser = self._new_parser(model)
        self.cfg = cfg
        self.engine.cfg = cfg
        self.engine.use_model(model)
        self.model = model
        if self.recorder is not None:
            self.recorder.use_layout(model.manifest.channels, model.manifest.sample_period_s)
        self._model_stamp = _stamp(cfg.model.path)
        self.metrics.model_reloads_total.labels(result="ok").inc()
        # The retained status names the model being served.
        self.link.set_status(self.engine.status("online"), self.engine.status("offline"))
        m = model.manifest
        log.info("reloaded (%s): model %s %s sha256 %s", why, m.name, m.version, model.sha256)
        self.notifier.send("READY=1", f"STATUS=model {m.name} {m.version}")

    def _new_parser(self, model: Model | None = None) -> ReadingParser:
        channels = (model or self.model).manifest.channels
        self._channel_index = {name: i for i, name in enumerate(channels)}
        return ReadingParser(
            channels,
            max_payload_bytes=self.cfg.ingest.max_payload_bytes,
            max_batch=self.cfg.ingest.max_batch_readings,
        )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _op_label(op: str) -> str:
    known = ("denoise", "encode", "hash", "score", "mute", "unmute", "sensitivity")
    return op if op in known else "other"


def _reply_to_field(payload: bytes) -> str | None:
    import json

    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    value = doc.get("reply_to") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
