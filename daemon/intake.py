"""Intake: the MQTT network thread's side of the daemon — route, parse, validate, queue.

Every message the link offers ends in exactly one place: the ingest queue (as `Work`), the
operations responder, or a drop counted under `oteo_messages_total{result=...}`. The answer to
the link says whether to acknowledge: a QoS 1 reading that finds the queue full is refused
(`False`), so it waits at the broker instead of being lost.

The model's channel layout is swapped by the main loop at a reload while this thread parses:
both read one immutable `Layout` through a single attribute, and every `Work` carries the layout
it was parsed with, so the engine can refuse readings cut for another model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.config import IngestSection
from daemon.metrics import Metrics
from daemon.mqtt import Incoming
from daemon.reading import ChannelSample, ParsedReading, PayloadError, ReadingParser

log = logging.getLogger(__name__)

MAX_STREAM_ID = 128


@dataclass(frozen=True, slots=True)
class Layout:
    """How readings are parsed for one model: its channels, in order."""

    generation: int  # increases whenever the channels change
    channels: tuple[str, ...]
    parser: ReadingParser
    index: dict[str, int]  # channel name -> position, for per-channel topics


@dataclass(slots=True)
class Work:
    """One validated message for the main loop: readings of a stream, or one channel sample."""

    stream: str
    readings: list[ParsedReading] | None
    layout: Layout
    channel: int = -1
    sample: ChannelSample | None = None
    arrival: float = 0.0  # monotonic time the network thread received it
    size: int = 1  # readings it holds (the ingest queue is bounded in readings)
    partition: int = -1  # the partition session it came on (-1: the instance's own link)
    ticket: int = 0  # its number in that session's ack ledger (daemon/mqtt/ledger.py)


def new_layout(
    channels: Sequence[str],
    generation: int = 0,
    *,
    max_payload_bytes: int = 65536,
    max_batch: int = 1000,
) -> Layout:
    """The layout of a model with these channels (the limits bound what the parser takes)."""
    parser = ReadingParser(channels, max_payload_bytes=max_payload_bytes, max_batch=max_batch)
    index = {name: i for i, name in enumerate(channels)}
    return Layout(generation, tuple(channels), parser, index)


class Intake:
    """Turns offered MQTT messages into queued `Work`; see the module docstring."""

    def __init__(
        self,
        cfg: IngestSection,
        metrics: Metrics,
        *,
        input_prefix: str,
        ops_prefix: str,
        channels: list[str],
        on_op: Callable[[Incoming], None],
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._on_op = on_op
        self._ops_prefix = ops_prefix + "/"
        self._prefix_levels = input_prefix.count("/") + 1
        self.layout = self._new_layout(0, channels)
        # queue.Queue, not SimpleQueue: with SimpleQueue the main loop was seen blocked inside
        # get(timeout=0.05) for over 10 s after SIGHUP reloads (py-spy; about one run in three
        # of the bad-model reload test), never with Queue. The bound counts readings, not
        # messages (a batch payload holds many), so memory stays bounded; each counter has one
        # writer: the network thread the first, the main loop the second.
        self.queue: queue.Queue[Work] = queue.Queue()
        self._queued = 0
        self._taken = 0
        # Held while a message is checked and queued, so shutdown cannot slip between the two
        # (a reading acknowledged but queued after the final drain would be lost).
        self._lock = threading.Lock()
        self._accepting = True
        self._ok = metrics.messages_total.labels(result="ok")
        self.last_ok = time.monotonic()  # arrival of the last valid message

    # -- main loop ---------------------------------------------------------------------------

    def use_channels(self, channels: Sequence[str]) -> None:
        """Parse for a new model from now on (a new generation only if the channels differ)."""
        if tuple(channels) != self.layout.channels:
            self.layout = self._new_layout(self.layout.generation + 1, channels)

    def take(self, timeout_s: float) -> Work | None:
        """The next queued message, waiting up to `timeout_s` (0: no wait); None if none."""
        try:
            work = self.queue.get(timeout=timeout_s) if timeout_s > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        self._taken += work.size
        return work

    def close(self) -> None:
        """Stop taking messages; those offered from now on stay unacknowledged at the broker."""
        with self._lock:
            self._accepting = False

    def _new_layout(self, generation: int, channels: Sequence[str]) -> Layout:
        return new_layout(
            channels,
            generation,
            max_payload_bytes=self.cfg.max_payload_bytes,
            max_batch=self.cfg.max_batch_readings,
        )

    # -- network thread ----------------------------------------------------------------------

    def offer(self, msg: Incoming) -> bool:
        """Route, parse and queue one message; False: not taken now (do not acknowledge)."""
        return self.offer_reading(msg) is not None

    def offer_reading(
        self, msg: Incoming, partition: int = -1, ticket: int = 0, topic_at: int = 0
    ) -> Work | bool | None:
        """`offer`, saying what became of it: the queued Work, True (taken, nothing queued:
        an op or a dropped message) or None (not taken). A partition session's messages carry
        their partition and ledger ticket; their topic is read from character `topic_at` on
        (after `<prefix>/<k>/`)."""
        with self._lock:
            if not self._accepting:
                return None
            if not topic_at and msg.topic.startswith(self._ops_prefix):
                self._on_op(msg)
                return True
            try:
                work = self._parse(msg, topic_at)
            except PayloadError as exc:
                self.metrics.messages_total.labels(result=exc.reason).inc()
                log.debug("dropped message on %s: %s", msg.topic, exc)
                return True
            if work is None:
                self.metrics.messages_total.labels(result="unknown_stream_topic").inc()
                return True
            work.partition, work.ticket = partition, ticket
            queued = self._enqueue(work, msg.qos)
            return None if queued is None else work if queued else True

    def _parse(self, msg: Incoming, topic_at: int = 0) -> Work | None:
        """The message as Work; None for a topic that is not a stream's; PayloadError if bad."""
        topic = msg.topic[topic_at:] if topic_at else msg.topic
        rest = topic.split("/")[self._prefix_levels :]
        stream = rest[0] if rest else ""
        if not stream or len(stream) > MAX_STREAM_ID:
            return None
        layout = self.layout  # one read: parser and channel index of the same model
        horizon = time.time() + self.cfg.max_future_s
        if len(rest) == 2 and rest[1] == "data":
            readings = layout.parser.parse(msg.payload)
            if any(r.ts > horizon for r in readings):
                raise PayloadError("bad_timestamp", "a timestamp is too far in the future")
            return Work(stream, readings, layout, arrival=time.monotonic(), size=len(readings))
        if len(rest) == 3 and rest[1] == "ch":
            index = layout.index.get(rest[2])
            if index is None:
                raise PayloadError("unknown_channel", f"unknown channel {rest[2]!r}")
            sample = layout.parser.parse_channel_sample(msg.payload)
            if sample.ts is not None and sample.ts > horizon:
                raise PayloadError("bad_timestamp", "the timestamp is too far in the future")
            return Work(stream, None, layout, index, sample, arrival=time.monotonic())
        return None

    def _enqueue(self, work: Work, qos: int) -> bool | None:
        """True: queued; False: dropped (QoS 0, queue full); None: refused for now."""
        depth = self._queued - self._taken
        # An empty queue takes any message, so a batch larger than the bound still gets in.
        if depth + work.size > self.cfg.queue_size and not self.queue.empty():
            if qos == 0:
                self.metrics.messages_total.labels(result="queue_full_qos0").inc()
                return False
            return None  # not acknowledged: the broker keeps it until there is room
        self._queued += work.size
        self.queue.put(work)
        self._ok.inc()
        self.metrics.last_message_timestamp_seconds.set(time.time())
        self.last_ok = work.arrival
        return True
