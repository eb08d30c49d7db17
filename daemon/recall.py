"""The memory of recorded streams' windows as hash bits: `similar` search and `seen_before`.

For every scored window of a recorded stream (`[record] streams`) the engine hands over the
window's hash bits — code > 0.5 for models trained with --hashing, code > its training median
for the others (`Manifest.hash_cut`), bit 0 of the code the most significant — with its score and
alarm. They go into an in-memory `CodeIndex` (searched by Hamming distance) and into the
recording (`code` table), so a restart loads them back; both follow the recording's retention.
Bits belong to one model file: after a model change the memory holds that model's windows only.

Alarm windows also get a residual signature (`daemon.signature`: which channels are off, which
way, how much), kept in a second, small index: episodes are compared by it, since the code says
more about where the machine runs than about how it fails. `seen_before` runs on the main loop
when an alarm starts: the nearest earlier alarm episodes within `[similar] max_distance` bits of
the start window's signature. `similar` runs in op threads: by code bits for a window, bits or a
stream and time; by signature among alarm windows for an event id.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from daemon.hashindex import CodeIndex, hash_bits
from daemon.journal import Episode, Journal
from daemon.manifest import Manifest
from daemon.messages import SeenBefore, format_ts
from daemon.metrics import Metrics
from daemon.model import Model
from daemon.recorder import Recorder
from daemon.recording import read_windows
from daemon.request import (
    EpisodeSummary,
    ErrorCode,
    EventsQuery,
    LabelReply,
    LabelRequest,
    SimilarHit,
    SimilarReply,
    SimilarRequest,
    bits_to_hex,
    hex_to_bits,
)
from daemon.section import SimilarSection
from daemon.signature import ResidualSignature

log = logging.getLogger(__name__)

MAX_BITS = 64
# Mutes of similar episodes in force at once, at most: each is checked at every alarm start.
MAX_SIMILAR_MUTES = 100


class QueryError(ValueError):
    """A `similar` query that cannot be answered; `code` is the op error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class Recall:
    """Hash bits of recorded windows, for one model at a time; see the module docstring."""

    def __init__(
        self,
        cfg: SimilarSection,
        journal: Journal,
        recorder: Recorder | None,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.recorder = recorder
        self.metrics = metrics
        self.index: CodeIndex | None = None  # every window's code bits
        self.faults: CodeIndex | None = None  # alarm windows' residual signatures
        self.signature: ResidualSignature | None = None
        self.nbits = 0
        self._cut: np.ndarray | None = None
        for name, count in journal.label_counts().items():
            metrics.event_labels.labels(name).set(count)
        # Replaced whole by op threads, read by the main loop: event id -> until (wall clock).
        self._mutes: dict[str, float] = journal.similar_mutes(time.time())
        self._labelling = threading.Lock()

    @property
    def active(self) -> bool:
        return self.index is not None

    def use_model(self, manifest: Manifest, sha256: str) -> None:
        """Hold the windows of this model (loaded from the recording); off if it cannot hash."""
        self.index, self.faults, self.signature, self._cut = None, None, None, None
        cut = manifest.hash_cut()
        why = None
        if self.recorder is None:
            why = "no stream is recorded ([record] streams)"
        elif cut is None:
            why = "the model has no hash rule (re-export it, or train with --hashing)"
        elif manifest.code_size > MAX_BITS:
            why = f"its code has {manifest.code_size} units, more than {MAX_BITS} bits"
        if why is not None:
            log.info("similar windows and seen_before are off: %s", why)
            return
        assert self.recorder is not None and cut is not None
        self.nbits = manifest.code_size
        self._cut = np.asarray(cut, dtype=np.float32)
        self.signature = ResidualSignature.of(manifest)
        self.index, self.faults = self._load(self.recorder.path, sha256)
        self.recorder.use_codebook(sha256, self.nbits)
        self._update_gauges()

    def _load(self, path: Path, sha256: str) -> tuple[CodeIndex, CodeIndex | None]:
        index = CodeIndex(self.nbits)
        sig = self.signature
        faults = CodeIndex(sig.bits) if sig is not None else None
        t0 = time.perf_counter()
        for streams, ts, score, alarm, events, words, sigs in read_windows(path, sha256):
            index.add_many(streams, ts, score, alarm, events, words)
            keep = np.flatnonzero(alarm & (sigs >= 0))
            if faults is not None and len(keep):
                faults.add_many(
                    [streams[i] for i in keep],
                    ts[keep],
                    score[keep],
                    alarm[keep],
                    [events[i] for i in keep],
                    sigs[keep].astype(np.uint64),
                )
        if len(index):
            log.info(
                "similar: %d recorded windows of this model loaded in %.1f s (%d MB)",
                len(index),
                time.perf_counter() - t0,
                index.nbytes >> 20,
            )
        return index, faults

    # -- main loop ---------------------------------------------------------------------------

    def words(self, code: np.ndarray) -> np.ndarray | None:
        """Hash bits of a batch of codes [B, K] as uint64 words; None when off."""
        if self._cut is None:
            return None
        return hash_bits(code, self._cut)

    def signatures(
        self, windows: np.ndarray, reconstruction: np.ndarray, channel_score: np.ndarray
    ) -> np.ndarray | None:
        """Residual signatures of a batch (raw-unit windows and reconstructions); None: off."""
        if self.signature is None or self.index is None:
            return None
        return self.signature.words(windows, reconstruction, channel_score)

    def observe(
        self,
        stream: str,
        ts: float,
        score: float,
        event_id: str | None,
        word: int,
        sig: int | None = None,
    ) -> None:
        """One scored window of a stream (kept only if the stream is recorded); `event_id`:
        the alarm it is in, whose windows' signatures are kept too."""
        index, recorder = self.index, self.recorder
        if index is None or recorder is None or not recorder.wants(stream):
            return
        alarm = event_id is not None
        index.add(stream, ts, score, alarm, event_id, word)
        kept_sig = sig if alarm and self.faults is not None else None
        if kept_sig is not None and self.faults is not None:
            self.faults.add(stream, ts, score, True, event_id, kept_sig)
        recorder.record_code(stream, ts, score, event_id, word, kept_sig)

    def remembers(self, stream: str) -> bool:
        return self.index is not None and self.recorder is not None and self.recorder.wants(stream)

    def seen_before(self, sig: int, event_id: str, stream: str) -> list[SeenBefore] | None:
        """The earlier alarm episodes whose signatures lie within max_distance bits of this
        start window's, nearest first; None when not searched ([similar] seen_before = 0)."""
        faults = self.faults
        if faults is None or self.cfg.seen_before == 0:
            return None
        hits = faults.nearest_events(
            sig, self.cfg.seen_before, max_distance=self.cfg.max_distance, exclude_event=event_id
        )
        labels = self.journal.labels_of([h.event_id for h in hits])
        out = []
        for hit in hits:
            episode = self.journal.get(hit.event_id)
            label, cause = labels.get(hit.event_id, (None, None))
            started = episode.started_ts if episode is not None else hit.ts
            out.append(
                SeenBefore(
                    event_id=hit.event_id,
                    stream=hit.stream,
                    started=format_ts(started),
                    distance=hit.distance,
                    label=label,
                    cause=cause,
                )
            )
        m = self.metrics
        m.alarm_starts_total.labels(m.stream_label(stream), "before" if out else "new").inc()
        return out

    def suppressing(self, sig: int, event_id: str) -> str | None:
        """The false-alarm episode with a mute of similar episodes in force whose signature
        this start window's is within max_distance of, if any."""
        faults, now = self.faults, time.time()
        active = {e for e, until in self._mutes.items() if until > now}
        if faults is None or not active:
            return None
        hits = faults.nearest_events(
            sig, len(faults), max_distance=self.cfg.max_distance, exclude_event=event_id
        )
        return next((h.event_id for h in hits if h.event_id in active), None)

    def retain(self) -> None:
        """Drop what the recording no longer holds (age and size caps); call once a second."""
        if self.index is not None and self.recorder is not None:
            self.index.drop_before(self.recorder.oldest_ts)
            if self.faults is not None:
                self.faults.drop_before(self.recorder.oldest_ts)
            self._update_gauges()

    def _update_gauges(self) -> None:
        index, faults = self.index, self.faults
        self.metrics.similar_windows.set(len(index) if index is not None else 0)
        held = (index.nbytes if index else 0) + (faults.nbytes if faults else 0)
        self.metrics.similar_index_bytes.set(held)

    # -- op threads --------------------------------------------------------------------------

    def label(self, request: LabelRequest) -> LabelReply:
        """Label a journalled episode; QueryError not_found for an unknown event id."""
        with self._labelling:  # one label at a time: the mutes are read, then replaced
            episode = self._label(request)
        log.info(
            "event %s of %s labelled %s%s%s",
            episode.event_id,
            episode.stream,
            request.label,
            f" ({request.cause})" if request.cause else "",
            f" by {request.by}" if request.by else "",
        )
        m = self.metrics
        m.labels_total.labels(m.stream_label(episode.stream), request.label).inc()
        for name, count in self.journal.label_counts().items():
            m.event_labels.labels(name).set(count)
        return LabelReply(episode=EpisodeSummary(**episode.to_dict()), id=request.id)

    def _label(self, request: LabelRequest) -> Episode:
        now = time.time()
        active = {e: u for e, u in self._mutes.items() if u > now and e != request.event_id}
        if request.mute_similar_s is not None and len(active) >= MAX_SIMILAR_MUTES:
            raise QueryError(
                "bad_request",
                f"{MAX_SIMILAR_MUTES} mutes of similar episodes are in force; let some expire",
            )
        at = float(request.at) if request.at is not None else None
        episode = self.journal.label(
            request.event_id, request.label, cause=request.cause, by=request.by, at_ts=at
        )
        if episode is None:
            raise QueryError("not_found", f"no alarm episode {request.event_id!r} is known")
        # A new label replaces the old one, and with it any mute the old one asked for.
        if request.mute_similar_s is not None:
            active[request.event_id] = now + request.mute_similar_s
        self.journal.mute_similar(request.event_id, active.get(request.event_id))
        self._mutes = active
        return self.journal.get(request.event_id) or episode

    def episodes(self, query: EventsQuery) -> list[EpisodeSummary]:
        """Journalled episodes, newest first (`GET /v1/events`)."""
        found = self.journal.episodes(label=query.label, stream=query.stream, limit=query.limit)
        return [EpisodeSummary(**e.to_dict()) for e in found]

    def similar(self, request: SimilarRequest, model: Model) -> SimilarReply:
        """Answer a `similar` request; QueryError when it cannot be."""
        index = self.index
        if index is None:
            raise QueryError(
                "unavailable",
                "no memory of windows: record streams ([record] streams) with a model that hashes",
            )
        word, stream, lo, hi = self._query(request, model, index)
        nbits, by = self.nbits, "code"
        if request.event_id is not None and self.faults is not None:
            sig = self._episode_sig(request.event_id)
            if sig is not None:  # an episode: compared by how it fails, among alarm windows
                word, index, by = sig, self.faults, "signature"
                nbits = self.faults.bits
        exclude_s = self.cfg.exclude_s if request.exclude_s is None else request.exclude_s
        hits = index.nearest(
            word,
            request.k,
            exclude_stream=stream,
            exclude_from_ts=lo - exclude_s,
            exclude_to_ts=hi + exclude_s,
            alarm_only=request.alarm_only,
        )
        labels = self.journal.labels_of([h.event_id for h in hits if h.event_id is not None])
        none: tuple[None, None] = (None, None)
        return SimilarReply(
            by=by,
            bits=format(word, f"0{-(-nbits // 4)}x"),
            nbits=nbits,
            windows=len(index),
            hits=[
                SimilarHit(
                    stream=h.stream,
                    ts=format_ts(h.ts),
                    distance=h.distance,
                    score=h.score,
                    alarm=h.alarm,
                    event_id=h.event_id,
                    label=labels.get(h.event_id or "", none)[0],
                    cause=labels.get(h.event_id or "", none)[1],
                )
                for h in hits
            ],
            id=request.id,
        )

    def _episode_sig(self, event_id: str) -> int | None:
        episode = self.journal.get(event_id)
        if episode is None:
            return None
        return episode.peak_sig if episode.peak_sig is not None else episode.start_sig

    def _query(
        self, request: SimilarRequest, model: Model, index: CodeIndex
    ) -> tuple[int, str | None, float, float]:
        """The query's word, and the stream and time span whose neighbourhood is left out."""
        never = (None, -np.inf, -np.inf)
        if request.window is not None:
            windows = np.asarray([request.window], dtype=np.float32)
            try:
                model.check_windows(windows)
            except ValueError as exc:
                raise QueryError("bad_request", str(exc)) from exc
            words = self.words(model.run(windows).code)
            assert words is not None
            return (int(words[0]), *never)
        if request.bits is not None:
            try:
                bits = hex_to_bits(request.bits, self.nbits)
            except ValueError as exc:
                raise QueryError("bad_request", f"bits: {exc}") from exc
            return (int(bits_to_hex(bits), 16), *never)
        if request.event_id is not None:
            episode = self.journal.get(request.event_id)
            if episode is None:
                raise QueryError("not_found", f"no alarm episode {request.event_id!r} is known")
            word = episode.peak_word if episode.peak_word is not None else episode.start_word
            if word is None:
                raise QueryError("not_found", f"episode {request.event_id!r} has no hash bits")
            end = episode.ended_ts if episode.ended_ts is not None else time.time()
            return word, episode.stream, episode.started_ts, end
        assert request.stream is not None and request.ts is not None
        found = index.word_at(request.stream, float(request.ts))
        if found is None:
            raise QueryError(
                "not_found", f"no recorded window of {request.stream!r} near that time"
            )
        return found, request.stream, float(request.ts), float(request.ts)
