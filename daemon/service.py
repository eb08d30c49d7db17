"""The running daemon: wires model, intake, engine, publisher, MQTT link, HTTP and systemd.

Threads: the MQTT network thread (the link; it offers each message to the `Intake`, which parses,
validates and queues it), the HTTP server's threads (metrics, health, operations), two workers
for MQTT operation requests (`Responder`), and the main loop (`Daemon.run`), the one owner of all
stream state: it takes queued readings into the `Engine`, whose outputs the `Publisher` hands to
the link. Signal handlers only set flags that the main loop reads.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import prometheus_client

from daemon import __version__
from daemon.config import Config, load_config
from daemon.control import Controls
from daemon.drain import Drain
from daemon.engine import Engine
from daemon.http import HttpServer
from daemon.intake import Intake
from daemon.memory import StreamMemory
from daemon.messages import Status, format_ts
from daemon.metrics import Metrics
from daemon.mqtt import LinkState, MqttLink, Outgoing
from daemon.notify import Notifier
from daemon.ops import OpsHandler
from daemon.partitions import Partitions, session_factory
from daemon.publisher import Publisher, Topics
from daemon.recall import Recall
from daemon.responder import Responder
from daemon.startup import REFUSALS, StartupError, check_startup, startup_step
from daemon.state_dir import open_journal, open_outbox, open_recorder
from daemon.telemetry import LinkMirror, Summary

log = logging.getLogger(__name__)

TICK_S = 1.0
MODEL_POLL_S = 2.0


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
        self.notifier = Notifier()
        # `_created` series double the exposition and nobody graphs them (process-wide switch).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.metrics = Metrics(max_stream_labels=cfg.metrics.max_stream_labels)
        self.model = startup_step(lambda: check_startup(cfg).model)  # what `check-config` checks
        self._model_stamp = _stamp(cfg.model.path)
        self.topics = Topics(cfg.topics.input_prefix, cfg.topics.output_prefix, cfg.instance)
        self.controls = Controls(
            on_error=lambda: self.metrics.errors_total.labels(stage="control").inc()
        )
        self.publisher = Publisher(self.topics, self._send, self.metrics, qos=cfg.mqtt.qos)
        self.engine = startup_step(lambda: Engine(self.model, cfg, self.publisher, self.metrics))
        self.engine.memory = StreamMemory(cfg.state_dir, self.model.sha256)
        self.outbox = open_outbox(cfg)  # makes state_dir
        self.engine.memory.load()
        self.recorder = open_recorder(cfg, self.metrics, self.model.manifest)
        self.journal = open_journal(cfg)
        self.recall = Recall(cfg.similar, self.journal, self.recorder, self.metrics)
        self.recall.use_model(self.model.manifest, self.model.sha256)
        self.engine.episodes.recall, self.engine.episodes.journal = self.recall, self.journal
        self.ops = OpsHandler(
            lambda: self.model,
            control=self.controls.call,
            recall=self.recall,
            observe=self._observe_op,
        )
        self.responder = Responder(self.ops, self.topics.ops, self._send, self.metrics)
        self.intake = Intake(
            cfg.ingest,
            self.metrics,
            input_prefix=self.topics.input_prefix,
            ops_prefix=self.topics.ops,
            channels=self.model.manifest.channels,
            on_op=self.responder.submit,
        )
        self.http = self._make_http()
        self.link = self._make_link()
        self.mirror = LinkMirror(self.metrics)
        self.summary = Summary(self.metrics, time.monotonic(), cfg.log.summary_every_s)
        self.drain = Drain(
            self.intake, self.engine, self.metrics, wake=self._wake_links, recorder=self.recorder
        )
        self.partitions: Partitions | None = None
        if cfg.partitions.enabled:
            make_link = session_factory(cfg, self.topics, self._status)
            self.partitions = Partitions(
                cfg, self.engine, self.intake, self.metrics, self.model.sha256, make_link
            )
            self.drain.noted = self.partitions.note
        self._loop_alive = time.monotonic()

    def _make_http(self) -> HttpServer:
        cfg = self.cfg
        token = startup_step(cfg.http.token)
        return HttpServer(
            cfg.http.bind,
            cfg.http.port,
            registry=self.metrics.registry,
            ops=self.ops,
            health=self._health,
            ready=self._ready,
            streams=self.controls.snapshot,
            events=self.recall.episodes,
            token=token,
            on_request=lambda path, code: self.metrics.http_requests_total.labels(
                path=path, code=str(code)
            ).inc(),
        )

    def _make_link(self) -> MqttLink:
        cfg = self.cfg
        subscriptions = self.topics.subscriptions(cfg.mqtt.qos, cfg.topics.per_channel)
        if cfg.partitions.enabled:  # readings come on the partitions' sessions only
            subscriptions = [(f"{self.topics.ops}/+", 1)]
        return startup_step(
            lambda: MqttLink(
                cfg.mqtt,
                client_id=f"oteo-{cfg.instance}",
                subscriptions=subscriptions,
                status_topic=self.topics.status,
                online_payload=self._status("online"),
                offline_payload=self._status("offline"),
                on_message=self.intake.offer,
                outbox=self.outbox,
                on_state=self._on_link_state,
            )
        )

    def _wake_links(self) -> None:
        self.link.wake()
        if self.partitions is not None:
            self.partitions.wake()

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
            "oteo %s: model %s %s (sha256 %s), %d channels, window %d; http on %s:%d; "
            "mqtt %s as oteo-%s",
            __version__,
            m.name,
            m.version,
            self.model.sha256,
            len(m.channels),
            m.window,
            self.cfg.http.bind,
            self.http.port,
            self.cfg.mqtt.url,
            self.cfg.instance,
        )
        self.notifier.ready(f"model {m.name} {m.version}; waiting for MQTT")
        self.link.start()
        if self.partitions is not None:
            self.partitions.start()
        self._loop()
        return self._shutdown()

    def _loop(self) -> None:
        next_tick = next_poll = next_dog = next_record = time.monotonic()
        while not self._stop.is_set():
            self.drain.run(timeout_s=0.05)
            now = self._loop_alive = time.monotonic()
            self.controls.run(self.engine, self._republish)
            if self.partitions is not None:
                self.partitions.tick(now)
            if self._reload_requested:
                self._reload_requested = False
                self._reload("SIGHUP", reread_config=True)
            if now >= next_tick:
                next_tick = now + TICK_S
                self.drain.guarded("engine", self.engine.tick)
                self._update_gauges(now)
                self.summary.maybe_log(now)
            if self.engine.memory is not None and now >= self.engine.memory.next_save:
                self._save_streams()
            if self.recorder is not None and now >= next_record:
                next_record = now + self.cfg.record.flush_s
                self.recorder.flush(self.engine.streams)
                self.recall.retain()
            if now >= next_poll:
                next_poll = now + MODEL_POLL_S
                self._check_model_file()
            interval = self.notifier.watchdog_interval_s
            if interval is not None and now >= next_dog:
                next_dog = now + interval
                self.notifier.watchdog()

    def _shutdown(self) -> int:
        log.info("stopping: no new readings; finishing queued windows and flushing events")
        self.notifier.stopping()
        self.intake.close()  # further messages stay unacknowledged at the broker
        self.drain.run(timeout_s=0.0, until_empty=True)
        self.controls.run(self.engine, self._republish)
        self._save_streams()
        if self.partitions is not None:
            self.partitions.stop(timeout_s=10.0)
        if self.recorder is not None:
            self.recorder.flush(self.engine.streams)
            self.recorder.close()
        if not self.link.stop(timeout_s=10.0):
            log.warning(
                "%d events not acknowledged; they stay in the outbox for the next start",
                len(self.outbox),
            )
        self.http.stop()
        self.responder.close()
        self.journal.close()
        self.outbox.close()
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _save_streams(self) -> None:
        if self.engine.memory is not None:
            self.engine.memory.save(self.engine.streams.values(), self.cfg.ingest.max_streams)

    def request_reload(self) -> None:
        self._reload_requested = True

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

    def _update_gauges(self, now: float) -> None:
        m = self.metrics
        m.queue_depth_messages.set(max(self.drain.depth_peak, self.intake.queue.qsize()))
        self.drain.depth_peak = 0
        incomplete = sum(s.aligner.incomplete for s in self.engine.streams.values() if s.aligner)
        self.mirror.update(self.link.counters, self.outbox, incomplete)
        # Last, so that a scrape showing connected also shows every failure before it.
        m.mqtt_connected.set(1 if self.link.connected else 0)
        stale_s = self.cfg.ingest.stale_s(self.engine.model.manifest.sample_period_s)
        m.no_data.set(1 if now - self.intake.last_ok > stale_s else 0)

    # -- outputs -----------------------------------------------------------------------------

    def _send(self, msg: Outgoing) -> None:
        self.link.publish(msg)

    def _status(self, state: str) -> bytes:
        """The retained status payload (online, or offline for the last will)."""
        assert self.engine.serving is not None
        return Status(
            instance=self.cfg.instance,
            state=state,
            ts=format_ts(time.time()),
            version=__version__,
            model=self.engine.serving.ref,
        ).to_json()

    def _republish(self) -> None:
        """After a reconnect: retained states again (a non-durable publish may have been lost)."""
        for state in self.engine.states():
            self.publisher(state)

    def _on_link_state(self, state: LinkState, reason: str) -> None:
        if state is LinkState.CONNECTED:
            self.notifier.send(f"STATUS=connected to {self.cfg.mqtt.host}:{self.cfg.mqtt.port}")
            # Retained states again: non-durable publishes made while disconnected were dropped.
            self.controls.post("_republish")

    def _observe_op(self, op: str, result: str, seconds: float) -> None:
        self.metrics.ops_total.labels(op=op, result=result).inc()
        self.metrics.ops_duration_seconds.labels(op=op).observe(seconds)

    # -- health ------------------------------------------------------------------------------

    def _health(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._loop_alive
        return age < 10.0, {"main_loop_age_s": round(age, 3)}

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        ok, info = self._health()
        connected = self.link.connected
        extra = {}
        sessions_up = True
        if self.partitions is not None:  # every owned partition's session, too
            extra["partitions"] = self.partitions.sessions()
            sessions_up = all(extra["partitions"].values())
        assert self.engine.serving is not None
        return ok and connected and sessions_up, {
            **info,
            "mqtt_connected": connected,
            "model": self.engine.serving.ref.model_dump(),
            **extra,
        }

    # -- reload ------------------------------------------------------------------------------

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
            model = check_startup(cfg).model  # what `check-config` checks
            if cfg.partitions != self.cfg.partitions:
                log.warning("[partitions] changes take effect at the next start, not at a reload")
            self.engine.cfg = cfg
            self.engine.use_model(model)  # checks the alarm overrides first: may raise
        except REFUSALS as exc:
            self.engine.cfg = self.cfg
            log.error("reload (%s) failed, the current model keeps serving: %s", why, exc)
            self.metrics.model_reloads_total.labels(result="failed").inc()
            self.notifier.send("READY=1", f"STATUS=reload failed: {str(exc)[:200]}")
            return
        self.cfg = cfg
        self.model = model
        m = model.manifest
        self.intake.cfg = cfg.ingest
        self.intake.use_channels(m.channels)
        if self.recorder is not None:
            self.recorder.use_layout(m.channels, m.sample_period_s)
        self._model_stamp = _stamp(cfg.model.path)
        self.metrics.model_reloads_total.labels(result="ok").inc()
        if self.partitions is not None:
            self.partitions.use_model(model.sha256)
        # The retained status names the model being served.
        self.link.set_status(self._status("online"), self._status("offline"))
        log.info("reloaded (%s): model %s %s sha256 %s", why, m.name, m.version, model.sha256)
        self.notifier.send("READY=1", f"STATUS=model {m.name} {m.version}")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
