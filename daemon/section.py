"""The config file's sections (`[model]`, `[mqtt]`, …): strict pydantic models, fields described.

Strict: a value of the wrong type is refused, never converted (`k = "3"` is not a number, `true`
is not 1); an integer is accepted where a float is expected, since TOML writes 1.0 as `1`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from daemon.setting import ConfigError, FilePath, TopicPrefix, is_loopback, read_secret

PASSWORD_ENV = "OTEO_MQTT_PASSWORD"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are strictly typed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(Section):
    """The model file to serve."""

    path: FilePath = Field(description="The exported .onnx model file.")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Refuse to load a file whose sha256 differs (pin a deployment).",
    )
    onnx_threads: int = Field(
        1,
        ge=1,
        description="onnxruntime intra-op threads; 1 suits small models and shared edge boxes.",
    )


class MqttSection(Section):
    """The broker connection."""

    url: str = Field(
        "mqtt://localhost:1883",
        description="mqtt://host[:port] (default port 1883) or mqtts://host[:port] (TLS, 8883).",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version; 5 gives request/response ops via response topic."
    )
    username: str | None = Field(None, description="Broker user name.")
    password_file: FilePath | None = Field(
        None,
        description=f"File holding the password (may be under $CREDENTIALS_DIRECTORY); "
        f"without it the password comes from ${PASSWORD_ENV}, if set.",
    )
    ca_file: FilePath | None = Field(None, description="CA bundle to verify the broker (mqtts).")
    cert_file: FilePath | None = Field(None, description="Client certificate (mqtts).")
    key_file: FilePath | None = Field(None, description="Client certificate's key (mqtts).")
    tls_insecure: bool = Field(False, description="Skip the broker host name check (testing only).")
    keepalive_s: int = Field(30, ge=1, le=65535, description="MQTT keep-alive interval.")
    session_expiry_s: int = Field(
        86400,
        gt=0,
        description="How long the broker keeps the session (and queued QoS 1 readings) while "
        "the daemon is away.",
    )
    qos: Literal[0, 1] = Field(1, description="Subscription and event QoS.")
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect back-off.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Reconnect back-off cap.")
    max_inflight: int = Field(100, ge=1, description="Unacknowledged outgoing QoS 1 messages.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_is_int(cls, value: object) -> object:
        # A Literal compares by equality, so even in strict mode it takes true and 1.0 as 1.
        if type(value) is not int:
            raise ValueError("Input should be 0 or 1")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{value!r}: the scheme must be mqtt:// or mqtts://")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username and password_file, not in the url")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{value!r}: expected mqtt[s]://host[:port] only")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> MqttSection:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        if not self.tls:
            tls_only = [
                name
                for name in ("ca_file", "cert_file", "key_file", "tls_insecure")
                if getattr(self, name)
            ]
            if tls_only:
                raise ValueError(f"TLS settings ({', '.join(tls_only)}) need an mqtts:// url")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    def password(self) -> str | None:
        """The password, read now from `password_file` or else `$OTEO_MQTT_PASSWORD`."""
        if self.password_file is None:
            return os.environ.get(PASSWORD_ENV) or None
        return read_secret("mqtt.password_file", self.password_file).rstrip("\r\n")


class TopicsSection(Section):
    """Topic layout: `{input_prefix}/{stream}/data`, `{output_prefix}/{stream}/event`, …"""

    input_prefix: TopicPrefix = Field("sensors", description="Prefix of reading topics.")
    output_prefix: TopicPrefix = Field("oteo", description="Prefix of everything oteo publishes.")
    per_channel: bool = Field(
        True, description="Also subscribe to `{input_prefix}/{stream}/ch/{channel}` bare values."
    )
    publish_scores: bool = Field(
        False, description="Publish every window's score on `{output_prefix}/{stream}/score`."
    )


class IngestSection(Section):
    """Intake limits and stream timing; every bound protects memory on a small box."""

    queue_size: int = Field(10000, ge=1, description="Readings waiting for the main loop.")
    max_payload_bytes: int = Field(65536, ge=64, description="Larger payloads are dropped.")
    max_batch_readings: int = Field(1000, ge=1, description="Readings per batch payload.")
    max_streams: int = Field(1000, ge=1, description="Streams tracked at once.")
    max_gap_s: float | None = Field(
        None,
        gt=0,
        description="A longer silence restarts the stream's window; default 5 sample periods.",
    )
    reorder_tolerance_s: float = Field(
        0.0,
        ge=0,
        description="How late a reading may arrive and still be put in order. Readings are "
        "held this long before scoring, so it adds latency; 0 drops late readings (counted).",
    )
    max_future_s: float = Field(
        86400.0,
        gt=0,
        description="Readings stamped further than this ahead of this host's clock are dropped "
        "(bad_timestamp): one reading from a clock gone wild would otherwise re-anchor the stream.",
    )
    stale_after_s: float | None = Field(
        None,
        gt=0,
        description="Silence after which a stream's state is stale; default twice the gap.",
    )

    def gap_s(self, sample_period_s: float) -> float:
        """The effective max_gap_s for a model with this sample period."""
        return self.max_gap_s if self.max_gap_s is not None else 5 * sample_period_s

    def reorder_s(self, sample_period_s: float) -> float:
        """The effective reorder_tolerance_s (the same for every sample period)."""
        return self.reorder_tolerance_s

    def stale_s(self, sample_period_s: float) -> float:
        """The effective stale_after_s for a model with this sample period."""
        stale = self.stale_after_s
        return stale if stale is not None else 2 * self.gap_s(sample_period_s)


class ScoringSection(Section):
    """Micro-batching of windows across streams into one onnxruntime call."""

    max_batch: int = Field(256, ge=1, description="Windows per inference call.")
    max_wait_s: float = Field(
        0.02, ge=0, description="Longest a ready window waits for others to fill a batch."
    )


class AlarmSection(Section):
    """Overrides of the model's alarm policy (unset: the manifest's value)."""

    hop: int | None = Field(None, ge=1, description="Samples between two scored windows.")
    enter_threshold: float | None = Field(
        None, gt=0, description="Smoothed score at or above which a window exceeds."
    )
    exit_threshold: float | None = Field(
        None, gt=0, description="An alarm ends once the smoothed score stays below this."
    )
    k: int | None = Field(None, ge=1, description="Exceeding windows among the last n to alarm.")
    n: int | None = Field(None, ge=1, description="Length of the k-of-n window.")
    clear_windows: int | None = Field(
        None, ge=1, description="Consecutive windows below exit_threshold that end an alarm."
    )
    cooldown_windows: int | None = Field(
        None, ge=0, description="Windows after an alarm during which none starts."
    )
    smoothing_alpha: float | None = Field(
        None, gt=0, le=1, description="EWMA weight of the newest score; 1 = no smoothing."
    )
    baseline_samples: int | None = Field(
        None,
        ge=0,
        description="Trailing window (samples) of the dynamic threshold that moves with each "
        "stream's recent normal scores; 0: off (the calibrated thresholds only).",
    )
    new_level_s: float | None = Field(
        None,
        ge=0,
        description="A level that lasts about half this long (seconds) ends its alarm as a new "
        "normal, flagged; 0: never (an alarm lasts as long as the level).",
    )
    warmup_s: float | None = Field(
        None,
        ge=0,
        description="A new stream's first seconds that teach its trailing windows before they "
        "judge it; 0: judged from the first window.",
    )
    warmup_factor: float | None = Field(
        None,
        ge=0,
        description="During the warm-up only a score above this x the calibrated thresholds "
        "alarms; 0: the warm-up raises no alarm.",
    )
    baseline_learns_accepted: bool | None = Field(
        None,
        description="A level accepted as a new normal also enters the dynamic threshold's "
        "trailing window.",
    )

    @field_validator("warmup_factor")
    @classmethod
    def _factor_zero_or_above_one(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < 1:
            raise ValueError("must be 0 (a silent warm-up) or at least 1")
        return value

    sensitivity: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Per-stream factor dividing both thresholds: > 1 alarms sooner.",
    )


class HttpSection(Section):
    """The HTTP listener: /metrics, /healthz, /readyz and the ops API."""

    bind: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(9108, ge=0, le=65535, description="TCP port (0: any free port).")
    token_file: FilePath | None = Field(
        None,
        validate_default=True,
        description="File holding the bearer token the ops API requires; "
        "mandatory when bind is not a loopback address.",
    )

    @field_validator("token_file")
    @classmethod
    def _token_off_loopback(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        bind = info.data.get("bind")
        if value is None and bind is not None and not is_loopback(bind):
            raise ValueError(f"required when http.bind ({bind}) is not a loopback address")
        return value

    def token(self) -> str | None:
        """The ops API bearer token, read now from `token_file` (None: no token required)."""
        if self.token_file is None:
            return None
        token = read_secret("http.token_file", self.token_file).strip()
        if not token:
            raise ConfigError(f"http.token_file: {self.token_file} is empty")
        return token


class OutboxSection(Section):
    """The on-disk queue of events not yet acknowledged by the broker."""

    max_events: int = Field(10000, ge=1, description="Oldest events are dropped beyond this.")
    max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Size cap of the outbox.")


class MetricsSection(Section):
    """Prometheus metrics."""

    max_stream_labels: int = Field(
        100, ge=0, description="Streams with their own label values; the rest pool as _other."
    )


class LogSection(Section):
    """What the daemon logs while it runs, at INFO (connects, reloads, alarms, a summary)."""

    summary_every_s: float = Field(
        300.0,
        gt=0,
        description="One line this often: streams by state, readings per second, active alarms, "
        "drops by reason.",
    )
    alarm_every_s: float = Field(
        60.0,
        ge=0,
        description="Per stream, at most one alarm start (with its end) is logged this often; "
        "the others are counted in the next line. 0: every one.",
    )


class RecordSection(Section):
    """Recording of readings into `state_dir/recording.sqlite3`, for `oteo retrain`."""

    streams: list[str] = Field(
        default_factory=list,
        description="Streams to record: ids or shell patterns (`pump-*`); empty: recording off.",
    )
    max_mb: float = Field(
        256.0, gt=0, description="Size cap of the recording; the oldest readings go first."
    )
    max_age_h: float = Field(
        336.0, gt=0, description="Readings older than this (data time vs. wall clock) are deleted."
    )
    flush_s: float = Field(
        1.0, gt=0, le=60, description="Readings are written in one transaction this often."
    )


class SimilarSection(Section):
    """The memory of hash codes of recorded streams' windows: `similar` and `seen_before`."""

    seen_before: int = Field(
        3,
        ge=0,
        le=20,
        description="A start event names at most this many past alarm episodes whose windows "
        "hash within max_distance of its start window; 0: not searched.",
    )
    max_distance: int = Field(
        2,
        ge=0,
        le=64,
        description="Hamming distance (bits) within which a past episode counts as seen before.",
    )
    exclude_s: float = Field(
        3600.0,
        ge=0,
        description="A `similar` query leaves out its own stream's windows this close in time "
        "(requests may set their own).",
    )
