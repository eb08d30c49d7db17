"""Operations: requests on `oteo/ops/{instance}/{op}` or HTTP, and their replies.

Stateless operations (denoise, encode, hash, score) take windows; control operations (mute,
unmute, sensitivity) name a stream and are answered by the daemon's main loop.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from daemon.messages import Label, OutputMessage, Share, UtcTimestamp
from daemon.reading import FiniteNumber, InputTimestamp, StrictInput

Op = Literal["denoise", "encode", "hash", "score"]
OPS: tuple[Op, ...] = get_args(Op)
ControlOp = Literal["mute", "unmute", "sensitivity"]
MemoryOp = Literal["similar", "label"]
ErrorCode = Literal[
    "bad_request",
    "too_large",
    "not_hashable",
    "busy",
    "internal",
    "unknown_op",
    "unavailable",
    "not_found",
    "unauthorized",
]


# Operations: requests on `oteo/ops/{instance}/{op}` or HTTP, and their replies.


class OpRequest(StrictInput):
    """Windows to run an operation on; raw units, shape [batch][window][channels]."""

    windows: list[
        Annotated[list[Annotated[list[FiniteNumber], Field(min_length=1)]], Field(min_length=1)]
    ] = Field(min_length=1)
    reply_to: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[^+#]+$",
        description="Reply topic on MQTT 3.1.1 brokers (v5 uses the response topic).",
    )
    id: str | None = Field(None, max_length=200, description="Echoed in the reply.")

    @model_validator(mode="after")
    def _check_rectangular(self) -> OpRequest:
        rows = len(self.windows[0])
        cols = len(self.windows[0][0])
        for window in self.windows:
            if len(window) != rows or any(len(sample) != cols for sample in window):
                raise ValueError("every window must have the same [window][channels] shape")
        return self

    def array(self) -> npt.NDArray[np.float32]:
        """The windows as float32 [batch, window, channels], the model's input."""
        return np.asarray(self.windows, dtype=np.float32)


class _Reply(OutputMessage):
    id: str | None = Field(None, description="The request's id.")


class DenoiseReply(_Reply):
    """The denoised (reconstructed) windows, raw units."""

    op: Literal["denoise"] = "denoise"
    reconstruction: list[list[list[float]]]


class EncodeReply(_Reply):
    """The bottleneck code of each window."""

    op: Literal["encode"] = "encode"
    code: list[list[float]]


class HashReply(_Reply):
    """Binary codes as hex, bit 0 of the code most significant (see `bits_to_hex`).

    A bit is set where the code unit exceeds 0.5 (models trained with --hashing, whose code is
    near-binary) or its median on normal training data (other models).
    """

    op: Literal["hash"] = "hash"
    bits: list[Annotated[str, Field(pattern=r"^[0-9a-f]+$")]]
    nbits: int = Field(ge=1)

    @model_validator(mode="after")
    def _check_width(self) -> HashReply:
        digits = -(-self.nbits // 4)
        if any(len(h) != digits for h in self.bits):
            raise ValueError(f"each hash must have {digits} hex digits for {self.nbits} bits")
        return self


class ScoreReply(_Reply):
    """Score, p-value and per-channel scores of each window."""

    op: Literal["score"] = "score"
    score: list[float]
    p_value: list[Share]
    channel_score: list[list[float]]
    threshold: float = Field(gt=0, description="The model's enter threshold.")


class ErrorReply(_Reply):
    """A refused or failed operation."""

    op: Op | ControlOp | MemoryOp | None = Field(
        None, description="None when the requested op is not known."
    )
    error: ErrorCode
    message: str


# ---------------------------------------------------------------------------------------------
# Control operations: change a stream's alarm handling; the daemon's main loop answers them.

StreamId = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^[^/+#]+$", description="A stream id."),
]


class _ControlRequest(StrictInput):
    stream: StreamId
    reply_to: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[^+#]+$",
        description="Reply topic on MQTT 3.1.1 brokers (v5 uses the response topic).",
    )
    id: str | None = Field(None, max_length=200, description="Echoed in the reply.")


class MuteRequest(_ControlRequest):
    """Silence a stream's alarms for a while (scores are still computed)."""

    duration_s: float = Field(gt=0, le=7 * 86400, description="How long; at most 7 days.")
    reason: str | None = Field(None, max_length=500, description="Why, for the log.")


class UnmuteRequest(_ControlRequest):
    """End a stream's mute now."""


class SensitivityRequest(_ControlRequest):
    """Scale a stream's alarm sensitivity: the thresholds in force are divided by `factor`."""

    factor: float = Field(ge=0.1, le=10, description="Above 1: more sensitive; 1: the default.")


class ControlReply(_Reply):
    """The outcome of a control operation on one stream."""

    op: ControlOp
    stream: str
    ok: bool
    state: str | None = Field(None, description="The stream's state after the operation.")
    until: UtcTimestamp | None = Field(None, description="When a mute ends.")


def bits_to_hex(bits: npt.NDArray[np.bool_]) -> str:
    """Hash bits [nbits] as hex: bits[0] is the most significant bit of the number.

    The number is zero-padded on the left to ceil(nbits / 4) digits: [1, 0, 1] -> "5",
    [1, 0, 0, 0, 0, 0, 0, 1] -> "81".
    """
    flat = np.asarray(bits, dtype=bool)
    if flat.ndim != 1 or flat.size == 0:
        raise ValueError(f"bits must be a non-empty 1-d array, got shape {flat.shape}")
    nbits = flat.size
    padded = 8 * -(-nbits // 8)
    value = int.from_bytes(np.packbits(flat).tobytes(), "big") >> (padded - nbits)
    return format(value, f"0{-(-nbits // 4)}x")


def hex_to_bits(text: str, nbits: int) -> npt.NDArray[np.bool_]:
    """Inverse of `bits_to_hex`."""
    value = int(text, 16)
    if len(text) != -(-nbits // 4) or value >> nbits:
        raise ValueError(f"{text!r} is not a {nbits}-bit hash")
    nbytes = -(-nbits // 8)
    raw = (value << (8 * nbytes - nbits)).to_bytes(nbytes, "big")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:nbits].astype(bool)


# ---------------------------------------------------------------------------------------------
# Memory operations: similar windows of the past, and labels of alarm episodes.

ReplyTo = Annotated[
    str,
    Field(
        min_length=1,
        pattern=r"^[^+#]+$",
        description="Reply topic on MQTT 3.1.1 brokers (v5 uses the response topic).",
    ),
]
EventId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]


class SimilarRequest(StrictInput):
    """The k past windows whose hash bits are nearest to a query window's.

    Give exactly one query: `window` (raw units, [window][channels]), `bits` (hex, as the hash
    op writes them), `stream` with `ts` (the recorded window of that stream nearest that time),
    or `event_id` (the peak window of a journalled alarm episode, compared by its residual
    signature with other alarm windows).
    """

    window: (
        Annotated[list[Annotated[list[FiniteNumber], Field(min_length=1)]], Field(min_length=1)]
        | None
    ) = None
    bits: Annotated[str, Field(pattern=r"^[0-9a-f]+$", max_length=16)] | None = None
    stream: StreamId | None = None
    ts: InputTimestamp | None = None
    event_id: EventId | None = None
    k: int = Field(10, ge=1, le=100, description="How many windows.")
    exclude_s: float | None = Field(
        None,
        ge=0,
        le=366 * 86400,
        description="Windows of the query's stream this close in time to the query are left "
        "out (its own neighbourhood); default: the daemon's [similar] exclude_s.",
    )
    alarm_only: bool = Field(False, description="Only windows that were in an alarm.")
    reply_to: ReplyTo | None = None
    id: str | None = Field(None, max_length=200, description="Echoed in the reply.")

    @model_validator(mode="after")
    def _check_one_query(self) -> SimilarRequest:
        given = [
            self.window is not None,
            self.bits is not None,
            self.stream is not None or self.ts is not None,
            self.event_id is not None,
        ]
        if sum(given) != 1:
            raise ValueError("give exactly one of window, bits, stream with ts, event_id")
        if (self.stream is None) != (self.ts is None):
            raise ValueError("stream and ts go together")
        return self


class SimilarHit(BaseModel):
    """One past window near the query."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream: str
    ts: UtcTimestamp = Field(description="Time of the window's newest sample.")
    distance: int = Field(ge=0, description="Hamming distance to the query's bits.")
    score: float = Field(description="The window's score when it was scored.")
    alarm: bool = Field(description="The window was in an alarm.")
    event_id: str | None = Field(None, description="That alarm's event id.")
    label: Label | None = Field(None, description="That alarm's label, if labelled.")
    cause: str | None = None


class SimilarReply(_Reply):
    """The nearest past windows, nearest first (ties: newest first)."""

    op: Literal["similar"] = "similar"
    by: Literal["code", "signature"] = Field(
        description="What was compared: the code's hash bits (windows, bits, stream and time: "
        "every recorded window), or the residual signature (event ids: alarm windows only)."
    )
    bits: str = Field(description="The query's bits (hex).")
    nbits: int = Field(ge=1)
    windows: int = Field(ge=0, description="Windows in the memory that was searched.")
    hits: list[SimilarHit]


class LabelRequest(StrictInput):
    """Label an alarm episode: a false alarm, or confirmed with its cause."""

    event_id: EventId
    label: Label
    cause: str | None = Field(None, max_length=500, description='E.g. "bearing wear".')
    by: str | None = Field(None, max_length=200, description="Who labels it.")
    at: InputTimestamp | None = Field(None, description="When; default now.")
    mute_similar_s: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="false_alarm only, opt-in: for this long (at most 7 days), alarms whose "
        "start window hashes within [similar] max_distance of this episode's windows are not "
        "announced (their stream's state is muted; counted and logged). 0 < s <= 604800.",
    )
    reply_to: ReplyTo | None = None
    id: str | None = Field(None, max_length=200, description="Echoed in the reply.")

    @model_validator(mode="after")
    def _check_mute(self) -> LabelRequest:
        if self.mute_similar_s is not None and self.label != "false_alarm":
            raise ValueError("mute_similar_s goes with label false_alarm only")
        return self


class EpisodeSummary(BaseModel):
    """An alarm episode from the event journal, with its label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str
    stream: str
    started: UtcTimestamp
    ended: UtcTimestamp | None = Field(None, description="null while it lasts.")
    reason: str | None = Field(None, description="How it ended (the end event's reason).")
    peak_score: float
    top_channels: list[str] = Field(description="The channels behind its peak, largest first.")
    model_sha256: str
    label: Label | None
    cause: str | None
    labelled_by: str | None
    labelled: UtcTimestamp | None
    mute_similar_until: UtcTimestamp | None = Field(
        None, description="Alarms that hash like this episode are held back until then."
    )


class LabelReply(_Reply):
    """The episode as labelled."""

    op: Literal["label"] = "label"
    episode: EpisodeSummary


class EventsQuery(StrictInput):
    """`GET /v1/events` query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # query values are strings

    label: Literal["false_alarm", "confirmed", "none"] | None = Field(
        None, description="Only episodes with this label (none: unlabelled); default all."
    )
    stream: StreamId | None = None
    limit: int = Field(100, ge=1, le=1000, description="At most this many, newest first.")

    @classmethod
    def from_query_string(cls, text: str) -> EventsQuery:
        """Parse `label=…&stream=…&limit=…`; ValueError names the first bad parameter."""
        params = parse_qs(text, keep_blank_values=True)
        if any(len(values) > 1 for values in params.values()):
            raise ValueError("give each query parameter once")
        raw: dict[str, object] = {k: v[0] for k, v in params.items()}
        limit = raw.get("limit")
        if isinstance(limit, str) and limit.isdigit():
            raw["limit"] = int(limit)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None
