"""Operations: requests on `oteo/ops/{instance}/{op}` or HTTP, and their replies.

Stateless operations (denoise, encode, hash, score) take windows; control operations (mute,
unmute, sensitivity) name a stream and are answered by the daemon's main loop.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from daemon.messages import OutputMessage, Share, UtcTimestamp
from daemon.reading import FiniteNumber, StrictInput

Op = Literal["denoise", "encode", "hash", "score"]
OPS: tuple[Op, ...] = get_args(Op)
ControlOp = Literal["mute", "unmute", "sensitivity"]
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

    op: Op | ControlOp | None = Field(None, description="None when the requested op is not known.")
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
