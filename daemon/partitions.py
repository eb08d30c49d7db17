"""Partitioned intake: one persistent MQTT session per owned partition, checkpoints, held acks.

With `[partitions]`, the broker (nats-server's subject mapping) puts each stream's readings on
`<topic_prefix>/<k>/<input_prefix>/<stream>/data`. For every partition k it owns, the daemon runs
one `MqttLink` (MQTT 3.1.1, persistent session, client id `oteo-<group>-part-<k>`): its network
thread parses and queues readings through the shared `Intake`, tagging each with k and a ticket
of k's `AckLedger`. The main loop (the only caller of the methods below, besides the links'
state callbacks) notes each reading it handled, writes k's `Checkpoint` after
`checkpoint_readings` readings or `checkpoint_s`, and only then lets the link acknowledge them.

Start: each partition's checkpoint is loaded (its streams resume their windows). If the run that
held it did not stop cleanly, or left messages unacknowledged, the session is only connected
`redelivery_wait_s` after that run's last sign of life: by then the broker redelivers what was
never acknowledged first, ahead of newer readings (which would make them late).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from daemon.checkpoint import Checkpoint, FileWriter
from daemon.config import Config
from daemon.engine import Engine
from daemon.intake import Intake, Work
from daemon.memory import restore_stream
from daemon.metrics import Metrics
from daemon.mqtt import Incoming, LinkState, MqttLink
from daemon.mqtt.ledger import AckLedger
from daemon.publisher import Topics
from daemon.window_state import restore_window

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
BASELINES_EVERY_S = 60.0  # the detectors' baseline buffers: big, and slow to change
TAKEOVER_S = 10.0  # a session lost this soon after connecting may have been taken over

# (partition, its ledger or None, its on_message, its on_state) -> the partition's link
LinkFactory = Callable[
    [int, AckLedger | None, Callable[[Incoming], bool], Callable[[LinkState, str], None]],
    MqttLink,
]


def session_factory(cfg: Config, topics: Topics, status: Callable[[str], bytes]) -> LinkFactory:
    """Makes partition k's session: MQTT 3.1.1, persistent, client id `oteo-<group>-part-<k>`,
    its online/offline status retained on `<status topic of the instance>/part/<k>`."""
    section = cfg.partitions

    def make(
        k: int,
        ledger: AckLedger | None,
        on_message: Callable[[Incoming], bool],
        on_state: Callable[[LinkState, str], None],
    ) -> MqttLink:
        return MqttLink(
            cfg.mqtt,
            client_id=section.client_id(k),
            subscriptions=[(section.topic(k, topics.input_prefix), 1)],
            status_topic=f"{topics.status}/part/{k}",
            online_payload=status("online"),
            offline_payload=status("offline"),
            on_message=on_message,
            on_state=on_state,
            ledger=ledger,
            max_queued=1000,
        )

    return make


class _Partition:
    """One owned partition's main-loop state."""

    def __init__(self, k: int, checkpoint: Checkpoint, ledger: AckLedger | None) -> None:
        self.k = k
        self.checkpoint = checkpoint
        self.ledger = ledger
        self.link: MqttLink | None = None
        self.connect_at = 0.0  # wall time at which its session may connect
        self.ticket = 0  # ticket of the last reading the main loop handled
        self.since = 0  # readings handled since the last checkpoint
        self.dirty: set[str] = set()  # streams changed since the last checkpoint
        self.due = 0.0  # monotonic time of the next timed checkpoint
        self.baselines_due = time.monotonic() + BASELINES_EVERY_S
        self.writing = False  # a checkpoint is with the writer (cleared by its thread)


class Partitions:
    """The owned partitions' sessions, checkpoints and acks; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        intake: Intake,
        metrics: Metrics,
        model_sha256: str,
        make_link: LinkFactory,
    ) -> None:
        section = cfg.partitions
        assert section.count is not None
        self.section = section
        self.engine = engine
        self.intake = intake
        self.metrics = metrics
        self.directory: Path = section.checkpoint_dir or cfg.state_dir / "partitions"
        self._make_link = make_link
        self._prefix = {k: f"{section.topic_prefix}/{k}/" for k in section.partitions}
        self.parts = {
            k: _Partition(
                k,
                Checkpoint(self.directory, k, section.count, model_sha256),
                AckLedger() if section.ack_after_checkpoint else None,
            )
            for k in section.partitions
        }
        self._next_beat = 0.0
        self.writer: FileWriter | None = None  # from start() on: the disk off the main loop
        self._stopping = False  # read by the links' threads: a clean stop loses no session

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load each partition's checkpoint; its session connects now or after the wait."""
        self.writer = FileWriter()
        now = time.time()
        for part in self.parts.values():
            saved = part.checkpoint.read()
            resumed = 0
            for stream_id, doc in saved.streams.items():
                resumed += self._resume(part, stream_id, doc)
            if not saved.clean:
                # Readings the dead run took after its checkpoint come back and are scored
                # again: counted (oteo_rescored_readings_total) up to where its heartbeat saw it.
                for stream_id, last_ts in part.checkpoint.read_progress().items():
                    stream = self.engine.streams.get(stream_id)
                    if stream is not None and stream.partition == part.k:
                        stream.rescore_until_ts = last_ts
            if not saved.clean or saved.unacked:
                part.connect_at = saved.alive + HEARTBEAT_S + self.section.redelivery_wait_s
            wait_s = max(0.0, part.connect_at - now)
            log.info(
                "partition %d: %d streams resumed from %s%s",
                part.k,
                resumed,
                part.checkpoint.path,
                f"; connecting in {wait_s:.1f} s (redelivery after an unclean stop)"
                if wait_s
                else "",
            )
            self._write(part)  # the file exists from now on: its mtime is our heartbeat
            self.metrics.partition_owned.labels(partition=str(part.k)).set(0)
        self.tick(time.monotonic())

    def _resume(self, part: _Partition, stream_id: str, doc: dict[str, object]) -> bool:
        stream = self.engine.adopt(stream_id)
        stream.partition = part.k
        try:
            restore_window(stream.buffer, doc["window"])  # type: ignore[arg-type]
            stream.last_ts = float(doc["last_ts"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("stream %s: checkpointed window not used (%s)", stream_id, exc)
            stream.buffer.reset()
            return False
        part.dirty.add(stream_id)
        return restore_stream(stream, doc)

    def _connect(self, part: _Partition) -> None:
        k = part.k
        ledger = part.ledger
        prefix = self._prefix[k]
        readings = self.metrics.partition_readings_total.labels(partition=str(k))
        owned = self.metrics.partition_owned.labels(partition=str(k))
        intake = self.intake

        def on_message(msg: Incoming) -> bool:  # the link's network thread
            ticket = ledger.issue() if ledger is not None else 0
            at = len(prefix) if msg.topic.startswith(prefix) else 0
            result = intake.offer_reading(msg, k, ticket, topic_at=at)
            if result is None:
                return False
            if isinstance(result, Work):
                readings.inc(result.size)
                if ledger is not None:
                    ledger.queued(ticket)
            return True

        lost = self.metrics.partition_sessions_lost_total.labels(partition=str(k))
        since = [0.0]  # monotonic time of the last connect

        def on_state(state: LinkState, reason: str) -> None:  # the link's network thread
            now = time.monotonic()
            if state is LinkState.CONNECTED:
                since[0] = now
            elif state is LinkState.DISCONNECTED and since[0] and not self._stopping:
                lost.inc()
                if now - since[0] < TAKEOVER_S:
                    # nats-server closes the older of two connections with one client id
                    # ("last connect wins"): two owners take the session from each other.
                    log.warning(
                        "partition %d: session lost %.1f s after connecting; if this repeats, "
                        "another instance owns partition %d too (check [partitions] index/of)",
                        k,
                        now - since[0],
                        k,
                    )
                since[0] = 0.0
            owned.set(1 if state is LinkState.CONNECTED else 0)

        part.link = self._make_link(k, ledger, on_message, on_state)
        part.link.start()
        log.info("partition %d: session %s connecting", k, self.section.client_id(k))

    # -- main loop ---------------------------------------------------------------------------

    def note(self, work: Work) -> None:
        """The main loop handled `work` (from partition `work.partition`)."""
        part = self.parts.get(work.partition)
        if part is None:
            return
        part.ticket = work.ticket
        part.since += work.size
        part.dirty.add(work.stream)
        if part.since >= self.section.checkpoint_readings:
            self.checkpoint(part)

    def tick(self, now: float) -> None:
        """Timed checkpoints, delayed connects and the heartbeat; call every loop turn."""
        wall = time.time()
        for part in self.parts.values():
            if part.link is None and wall >= part.connect_at:
                self._connect(part)
            if part.since and now >= part.due:
                self.checkpoint(part)
            if now >= part.baselines_due:
                part.baselines_due = now + BASELINES_EVERY_S
                self._write_baselines(part)
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_S
            streams = self.engine.streams
            for part in self.parts.values():
                part.checkpoint.touch()
                if part.dirty:
                    dirty = (streams[s] for s in part.dirty if s in streams)
                    part.checkpoint.write_progress({s.id: s.last_ts for s in dirty})
                if part.ledger is not None:
                    held = len(part.ledger)
                    self.metrics.partition_acks_held.labels(partition=str(part.k)).set(held)

    def checkpoint(self, part: _Partition) -> None:
        """Hand partition k's checkpoint to the writer; once it is on disk, its link may
        acknowledge the readings it holds. One write per partition at a time: while the disk
        lags, acks wait (and the broker, at its max_ack_pending, waits too)."""
        if part.writing or self.writer is None:
            return
        self.engine.score_pending()  # windows ready but unscored would be lost at a crash
        streams = self.engine.streams
        changed = [streams[s] for s in part.dirty if s in streams]
        text = part.checkpoint.render(changed, tracked=streams)
        ticket, ledger, link = part.ticket, part.ledger, part.link
        part.dirty.clear()
        part.since = 0
        part.due = time.monotonic() + self.section.checkpoint_s
        part.writing = True

        def done(ok: bool) -> None:  # the writer's thread
            part.writing = False
            if not ok:  # acks stay held: after a crash the broker redelivers
                self.metrics.errors_total.labels(stage="checkpoint").inc()
                return
            self.metrics.checkpoints_total.inc()
            if ledger is not None and link is not None:
                ledger.cover(ticket)
                link.wake()

        self.writer.submit(part.checkpoint.path, lambda: text, done)

    def _write(self, part: _Partition, *, clean: bool = False, unacked: int = 0) -> bool:
        streams = self.engine.streams
        changed = [streams[s] for s in part.dirty if s in streams]
        try:
            part.checkpoint.write(changed, clean=clean, unacked=unacked)
        except OSError as exc:
            # Acks stay held: the broker redelivers after a crash what no checkpoint holds.
            self.metrics.errors_total.labels(stage="checkpoint").inc()
            log.warning("partition %d: checkpoint not written: %s", part.k, exc)
            return False
        part.dirty.clear()
        part.since = 0
        part.due = time.monotonic() + self.section.checkpoint_s
        self.metrics.checkpoints_total.inc()
        return True

    def _write_baselines(self, part: _Partition) -> None:
        streams = [s for s in self.engine.streams.values() if s.partition == part.k]
        if self.writer is None:
            return

        def done(ok: bool) -> None:  # the writer's thread
            if not ok:
                self.metrics.errors_total.labels(stage="checkpoint").inc()

        self.writer.submit(part.checkpoint.moving_path, part.checkpoint.moving(streams), done)

    def stop(self, timeout_s: float) -> None:
        """Clean stop (intake closed, queue drained): checkpoint, acknowledge, disconnect."""
        if self.writer is None:
            return
        self.writer.flush()  # a write in flight makes checkpoint() skip: let it finish
        for part in self.parts.values():
            self.checkpoint(part)
            self._write_baselines(part)
        self.writer.flush()
        self._stopping = True
        links = [p.link for p in self.parts.values() if p.link is not None]
        for link in links:
            link.request_stop(timeout_s)
        for part in self.parts.values():
            unacked = 0
            if part.link is not None:
                part.link.stop(timeout_s)
                unacked = part.link.counters.held_incoming
            self._write(part, clean=True, unacked=unacked)
            if unacked:
                log.info("partition %d: %d messages left for redelivery", part.k, unacked)
        self.writer.close()

    def wake(self) -> None:
        """Room in the ingest queue again: let the sessions offer what they hold."""
        for part in self.parts.values():
            if part.link is not None:
                part.link.wake()

    def use_model(self, sha256: str) -> None:
        """Checkpoints from now on belong to this model (after a hot reload)."""
        for part in self.parts.values():
            part.checkpoint.model_sha256 = sha256
            part.dirty.update(s.id for s in self.engine.streams.values() if s.partition == part.k)

    def sessions(self) -> dict[str, bool]:
        """Whether each owned partition's session is connected, by partition."""
        return {str(k): p.link is not None and p.link.connected for k, p in self.parts.items()}
