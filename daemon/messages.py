"""The messages oteo writes: events, stream state, status and window scores.

Each payload is a pydantic model here, the one definition the committed JSON Schemas are generated
from (`python -m daemon.jsonschema daemon/schema`). Every output carries `"schema":
SCHEMA_VERSION` and RFC 3339 UTC timestamps. Readings in are in `daemon.reading`, operation
requests and replies in `daemon.request`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from daemon.manifest import Manifest

SCHEMA_VERSION = 1

StateName = Literal["normal", "anomalous", "stale", "warming_up", "muted"]
STATES: tuple[StateName, ...] = get_args(StateName)
EventKind = Literal["start", "update", "end"]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
EndReason = Literal["cleared", "new_normal", "interrupted"]
# Which detection stage sets a stream's enter threshold (daemon/detector.py).
ThresholdSource = Literal["calibrated", "warm_up", "dynamic", "new_level"]
Label = Literal["false_alarm", "confirmed"]
LABELS: tuple[Label, ...] = get_args(Label)

_UTC_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"


def format_ts(unix_s: float) -> str:
    """Unix seconds as an RFC 3339 UTC string with a Z suffix (the output format)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# Output: events, state, status, scores.

UtcTimestamp = Annotated[
    str,
    Field(pattern=_UTC_Z, json_schema_extra={"format": "date-time"}),
]
Share = Annotated[float, Field(ge=0, le=1)]


class OutputMessage(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        serialize_by_alias=True,
        # Every field is always written, so the serialization schemas mark all as required.
        json_schema_serialization_defaults_required=True,
    )

    schema_version: int = Field(
        SCHEMA_VERSION, ge=1, alias="schema", description="Message schema version."
    )

    def to_json(self) -> bytes:
        """The wire form: JSON with `schema` as the version key."""
        return self.model_dump_json(by_alias=True).encode()


class ModelRef(BaseModel):
    """Which model file produced a message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the .onnx file.")

    @classmethod
    def of(cls, manifest: Manifest, sha256: str) -> ModelRef:
        """The reference to a loaded model file."""
        return cls(name=manifest.name, version=manifest.version, sha256=sha256)


class ChannelContribution(BaseModel):
    """How much one channel contributed to a window's score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str
    contribution: Share = Field(description="Share of the window's error from this channel.")
    score: float = Field(
        ge=0, description="Channel score normalised by its normal quantiles (1 ≈ usual maximum)."
    )
    observed: float = Field(description="Newest sample of the channel in that window, raw units.")
    expected: float = Field(description="The reconstruction of that sample, raw units.")
    direction: Literal["high", "low"] = Field(description="observed above or below expected.")


class SeenBefore(BaseModel):
    """A past alarm episode whose windows hash close to this alarm's start window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str
    stream: str
    started: UtcTimestamp = Field(description="When that episode started.")
    distance: int = Field(
        ge=0, description="Hamming distance between the hash bits (0: the same signature)."
    )
    label: Label | None = Field(None, description="The operator's label of that episode.")
    cause: str | None = Field(None, description="The label's cause (confirmed episodes).")


class Event(OutputMessage):
    """An alarm on `oteo/{stream}/event`: start, updates while it lasts, end; one event_id."""

    event_id: str = Field(description="Stable across the start, updates and end of one alarm.")
    kind: EventKind
    stream: str
    instance: str
    ts: UtcTimestamp = Field(description="Time of the window that produced this message.")
    started: UtcTimestamp
    ended: UtcTimestamp | None = Field(None, description="Set on kind=end.")
    duration_s: float | None = Field(
        None, ge=0, description="Set on kind=end: from the start to the end, data time."
    )
    reason: EndReason | None = Field(
        None,
        description="Set on kind=end: cleared (the score fell back below the exit threshold), "
        "new_normal (the level lasted the model's new-normal time and is accepted as the "
        "stream's normal from now on), interrupted (a gap, silence or a model change).",
    )
    score: float = Field(ge=0, description="Smoothed score of the window behind this message.")
    peak_score: float = Field(ge=0, description="Highest smoothed score since the start.")
    threshold: float = Field(gt=0, description="Enter threshold in force (after sensitivity).")
    threshold_source: ThresholdSource | None = Field(
        None,
        description="The stage that sets `threshold`: calibrated (the model file's, from held-back "
        "normal data), warm_up (calibrated x warmup_factor while a new stream teaches its trailing "
        "windows), dynamic (the stream's trailing scores), new_level (its trailing median x "
        "baseline_factor, which also accepts a lasting level as the new normal).",
    )
    p_value: Share = Field(description="P(a normal window scores at least `score`).")
    top_channels: list[ChannelContribution] = Field(
        description="The channels behind the alarm's peak window (the highest score since the "
        "start), largest contribution first: the same cause on start, update and end."
    )
    model: ModelRef
    seen_before: list[SeenBefore] | None = Field(
        None,
        description="Set on kind=start for recorded streams of a model that hashes: the nearest "
        "past alarm episodes within the configured distance, nearest first; [] means new. "
        "null: not searched (the stream is not recorded, or the model has no hash rule).",
    )


class StreamState(OutputMessage):
    """A stream's state, retained on `oteo/{stream}/state`."""

    stream: str
    state: StateName
    ts: UtcTimestamp
    score: float | None = Field(None, ge=0, description="Latest smoothed score.")
    threshold: float | None = Field(None, gt=0)
    event_id: str | None = Field(None, description="The active alarm, when anomalous.")
    since: UtcTimestamp | None = Field(None, description="When the stream entered this state.")


class Status(OutputMessage):
    """The daemon's availability, retained on `oteo/status/{instance}` (also the last will)."""

    instance: str
    state: Literal["online", "offline"]
    ts: UtcTimestamp
    version: str = Field(description="oteo version.")
    model: ModelRef | None = None


class WindowScore(OutputMessage):
    """Every scored window on `oteo/{stream}/score` (when topics.publish_scores is on)."""

    stream: str
    ts: UtcTimestamp = Field(description="Time of the window's last sample.")
    score: float = Field(ge=0)
    threshold: float = Field(gt=0)
    p_value: Share
    channel_scores: dict[str, float] = Field(description="Channel name to channel score.")


class HealthReply(OutputMessage):
    """The body of /healthz and /readyz."""

    ok: bool
    detail: dict[str, Any] = Field(description="What was checked, by name.")
