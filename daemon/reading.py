"""Readings in: the payloads of `sensors/{stream}/data` and `.../ch/{channel}`, and their parser.

The pydantic models are the contract the committed JSON Schemas are generated from. On the ingest
hot path `ReadingParser` applies the rules of `ReadingPayload` by hand on pydantic's JSON parser,
so that each refusal has exactly one drop reason (a metric label) and the values come out as a
channel-ordered float64 array with no intermediate objects; a unit test keeps the two in
agreement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from itertools import chain
from typing import Annotated, Any, Literal, NamedTuple, get_args

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationInfo,
    model_validator,
)
from pydantic_core import from_json

# Unix timestamps at or above this (year 5138) are almost certainly milliseconds: refused.
UNIX_TS_MAX = 1e11

DropReason = Literal[
    "too_large",
    "not_json",
    "bad_schema",
    "non_finite",
    "bad_type",
    "bad_timestamp",
    "unknown_channel",
    "missing_channel",
    "wrong_length",
    "empty_batch",
    "batch_too_large",
]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)


_RFC3339 = r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$"
_RFC3339_RE = re.compile(_RFC3339)
_NUMBER_TYPES = frozenset({int, float})
_READING_KEYS = frozenset({"ts", "seq", "values"})
_CHANNEL_KEYS = frozenset({"ts", "value"})


# The model computes in float32: a larger finite double would become inf inside the graph.
FLOAT32_MAX = float(np.finfo(np.float32).max)
SEQ_MAX = 2**63 - 1


class PayloadError(ValueError):
    """An incoming payload is refused; `reason` is one of DROP_REASONS (a metric label)."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: DropReason = reason


def parse_timestamp(value: object) -> float:
    """Unix seconds from a number of seconds or an RFC 3339 string with an offset."""
    ts: float | int
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = value  # compared before float(): a huge int would overflow
    elif isinstance(value, str) and _RFC3339_RE.match(value):
        try:
            ts = datetime.fromisoformat(value.upper()).timestamp()
        except (ValueError, OverflowError) as exc:
            raise PayloadError("bad_timestamp", f"invalid date or time {value!r}") from exc
    else:
        raise PayloadError("bad_timestamp", "ts must be unix seconds or an RFC 3339 string")
    if not 0 <= ts < UNIX_TS_MAX:  # also false for NaN
        raise PayloadError("bad_timestamp", f"ts {str(value)[:40]} is out of range (unix seconds?)")
    return float(ts)


# ---------------------------------------------------------------------------------------------
# Input: readings. The pydantic models are the contract; ReadingParser is the fast path.

FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]
InputTimestamp = Annotated[
    Annotated[float, Field(ge=0, lt=UNIX_TS_MAX)] | Annotated[str, Field(pattern=_RFC3339)],
    AfterValidator(parse_timestamp),
    Field(description="Unix seconds, or an RFC 3339 string with a Z or numeric offset."),
]


class StrictInput(BaseModel):
    # strict: "1.5" and true are not numbers; allow_inf_nan: NaN / Infinity are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Reading(StrictInput):
    """One sample of every channel of a stream, on `sensors/{stream}/data`."""

    ts: InputTimestamp
    seq: int | None = Field(
        None, ge=0, description="Optional sender sequence number; a jump counts lost readings."
    )
    values: (
        Annotated[dict[str, FiniteNumber], Field(min_length=1)]
        | Annotated[list[FiniteNumber], Field(min_length=1)]
    ) = Field(
        description="By channel name (every model channel, no others) or as an array in the "
        "model's channel order.",
    )

    @model_validator(mode="after")
    def _check_channels(self, info: ValidationInfo) -> Reading:
        channels = (info.context or {}).get("channels")
        if channels is None:
            return self
        if isinstance(self.values, list):
            if len(self.values) != len(channels):
                raise ValueError(f"expected {len(channels)} values, got {len(self.values)}")
        elif set(self.values) != set(channels):
            raise ValueError("values must name every model channel and no other")
        return self


class ReadingPayload(RootModel[Reading | Annotated[list[Reading], Field(min_length=1)]]):
    """A reading payload: one reading, or a non-empty array of readings (a batch)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="after")
    def _check_batch(self, info: ValidationInfo) -> ReadingPayload:
        max_batch = (info.context or {}).get("max_batch")
        if isinstance(self.root, list) and max_batch is not None and len(self.root) > max_batch:
            raise ValueError(f"batch of {len(self.root)} readings exceeds {max_batch}")
        return self


class ChannelReading(StrictInput):
    """One channel's sample as an object, on `sensors/{stream}/ch/{channel}`."""

    ts: InputTimestamp | None = Field(None, description="Arrival time when absent.")
    value: FiniteNumber


class ChannelPayload(RootModel[FiniteNumber | ChannelReading]):
    """A per-channel payload: a bare JSON number, or `{"ts": ..., "value": ...}`."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class ParsedReading(NamedTuple):
    """A validated reading: values in the model's channel order, float64 [channels], read-only."""

    ts: float
    seq: int | None
    values: npt.NDArray[np.float64]


class ChannelSample(NamedTuple):
    """A validated per-channel sample; `ts` is None when the payload carried none."""

    ts: float | None
    value: float


class ReadingParser:
    """Strict, fast parser for reading payloads: the rules of `ReadingPayload`, at line rate.

    A payload is accepted or refused whole: one bad reading drops its whole batch.
    """

    def __init__(self, channels: Sequence[str], max_payload_bytes: int, max_batch: int) -> None:
        self._channels = tuple(channels)
        self._names = frozenset(self._channels)
        self._max_payload_bytes = max_payload_bytes
        self._max_batch = max_batch

    def parse(self, payload: bytes) -> list[ParsedReading]:
        """Parse one reading or a batch; raises PayloadError with the drop reason."""
        raw = self._decode(payload)
        if type(raw) is dict:
            items: list[Any] = [raw]
        elif type(raw) is list:
            if not raw:
                raise PayloadError("empty_batch", "a batch needs at least one reading")
            if len(raw) > self._max_batch:
                raise PayloadError(
                    "batch_too_large", f"{len(raw)} readings exceed {self._max_batch}"
                )
            items = raw
        else:
            raise PayloadError("bad_schema", "expected a reading object or an array of them")
        stamps: list[float] = []
        seqs: list[int | None] = []
        rows: list[list[Any]] = []
        for item in items:
            if type(item) is not dict:
                raise PayloadError("bad_schema", "a reading must be a JSON object")
            if not item.keys() <= _READING_KEYS or "ts" not in item or "values" not in item:
                raise PayloadError("bad_schema", "a reading has ts, values and optional seq")
            stamps.append(parse_timestamp(item["ts"]))
            seq = item.get("seq")
            if seq is not None and (type(seq) is not int or not 0 <= seq <= SEQ_MAX):
                raise PayloadError("bad_type", "seq must be an integer in [0, 2**63 - 1]")
            seqs.append(seq)
            rows.append(self._ordered(item["values"]))
        if not set(map(type, chain.from_iterable(rows))) <= _NUMBER_TYPES:
            raise PayloadError("bad_type", "values must be JSON numbers")
        if len(rows) == 1:  # the common case: plain Python checks beat numpy's call overhead
            try:
                finite = all(map(math.isfinite, rows[0]))
            except OverflowError:  # an integer beyond float range
                finite = False
            if not finite or max(map(abs, rows[0])) > FLOAT32_MAX:
                raise PayloadError("non_finite", "values must be finite float32 numbers")
            values = np.array(rows[0], dtype=np.float64)
            values.flags.writeable = False
            return [ParsedReading(stamps[0], seqs[0], values)]
        try:
            matrix = np.array(rows, dtype=np.float64)
        except OverflowError as exc:
            raise PayloadError("non_finite", "a value is out of float range") from exc
        if not np.isfinite(matrix).all() or np.abs(matrix).max() > FLOAT32_MAX:
            raise PayloadError("non_finite", "values must be finite float32 numbers")
        matrix.flags.writeable = False  # rows are views of one array: no aliasing surprises
        return [ParsedReading(*r) for r in zip(stamps, seqs, matrix, strict=True)]

    def parse_channel_sample(self, payload: bytes) -> ChannelSample:
        """Parse a per-channel payload: a bare number or `{"ts": ..., "value": ...}`."""
        raw = self._decode(payload)
        ts: float | None = None
        if type(raw) is dict:
            if not raw.keys() <= _CHANNEL_KEYS or "value" not in raw:
                raise PayloadError("bad_schema", "a channel object has value and optional ts")
            if raw.get("ts") is not None:
                ts = parse_timestamp(raw["ts"])
            raw = raw["value"]
        elif type(raw) is list:
            raise PayloadError("bad_schema", "expected a number or a {ts, value} object")
        if type(raw) not in _NUMBER_TYPES:
            raise PayloadError("bad_type", "the value must be a JSON number")
        try:
            value = float(raw)
        except OverflowError as exc:
            raise PayloadError("non_finite", "the value is out of float range") from exc
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise PayloadError("non_finite", "the value must be a finite float32 number")
        return ChannelSample(ts, value)

    def parse_channel_value(self, payload: bytes) -> float:
        """The value of a per-channel payload (its timestamp, if any, dropped)."""
        return self.parse_channel_sample(payload).value

    def _decode(self, payload: bytes) -> Any:
        # The size cap comes first: never spend decoding work on an oversized payload.
        if len(payload) > self._max_payload_bytes:
            raise PayloadError(
                "too_large", f"{len(payload)} bytes exceed {self._max_payload_bytes}"
            )
        try:
            # pydantic's JSON parser (jiter): 4-5x faster than json.loads here. NaN and
            # Infinity parse, so that they are refused below as non_finite, not as not_json.
            return from_json(payload, allow_inf_nan=True)
        except ValueError as exc:  # syntax, invalid UTF-8, nesting too deep
            raise PayloadError("not_json", str(exc)) from exc

    def _ordered(self, values: Any) -> list[Any]:
        """The values of one reading as a list in channel order (types checked later)."""
        if type(values) is list:
            if len(values) != len(self._channels):
                raise PayloadError(
                    "wrong_length", f"expected {len(self._channels)} values, got {len(values)}"
                )
            return values
        if type(values) is not dict:
            raise PayloadError("bad_schema", "values must be an object or an array")
        if values.keys() != self._names:
            unknown = [name for name in values if name not in self._names]
            if unknown:
                raise PayloadError("unknown_channel", f"unknown channel {unknown[0]!r}")
            missing = [name for name in self._channels if name not in values]
            raise PayloadError("missing_channel", f"missing channel {missing[0]!r}")
        return [values[name] for name in self._channels]
