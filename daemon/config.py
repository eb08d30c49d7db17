"""The daemon's configuration: one TOML file, validated by pydantic, overridable from the CLI.

Unknown keys are errors, values are strictly typed and every field is described (the JSON Schema
and `oteo check-config` show the descriptions); the sections are in `daemon/section.py`. Secrets
never live in the file: the MQTT password comes from `mqtt.password_file` or
`$OTEO_MQTT_PASSWORD`. Checks that need the model file as well are in `daemon/startup.py`.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from daemon.manifest import AlarmPolicy
from daemon.partition_section import PartitionsSection
from daemon.section import (
    PASSWORD_ENV,
    AlarmSection,
    HttpSection,
    IngestSection,
    LogSection,
    MetricsSection,
    ModelSection,
    MqttSection,
    OutboxSection,
    RecordSection,
    ScoringSection,
    Section,
    SimilarSection,
    TopicsSection,
)
from daemon.setting import ConfigError, FilePath, TopicId, default_state_dir, read_secret

__all__ = [
    "PASSWORD_ENV",
    "AlarmSection",
    "Config",
    "ConfigError",
    "HttpSection",
    "IngestSection",
    "LogSection",
    "MetricsSection",
    "ModelSection",
    "MqttSection",
    "OutboxSection",
    "PartitionsSection",
    "RecordSection",
    "ScoringSection",
    "SimilarSection",
    "TopicsSection",
    "apply_alarm_overrides",
    "load_config",
    "read_secret",
]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class Config(Section):
    """The whole daemon configuration."""

    model: ModelSection = Field(description="The model file.")
    mqtt: MqttSection = Field(default_factory=MqttSection, description="Broker connection.")
    topics: TopicsSection = Field(default_factory=TopicsSection, description="Topic layout.")
    instance: TopicId = Field(
        default_factory=socket.gethostname,
        validate_default=True,
        description="This daemon's id in topics and the MQTT client id; default the host name "
        "(`<host name>-<index>` with `[partitions] index`, so instances on one box differ).",
    )
    ingest: IngestSection = Field(default_factory=IngestSection, description="Intake limits.")
    scoring: ScoringSection = Field(default_factory=ScoringSection, description="Batching.")
    alarm: AlarmSection = Field(default_factory=AlarmSection, description="Alarm overrides.")
    http: HttpSection = Field(default_factory=HttpSection, description="HTTP listener.")
    state_dir: FilePath = Field(
        None,  # unset: filled in by _state_dir_default
        validate_default=True,
        json_schema_extra=_no_default,  # the default depends on the environment, not null
        description="Outbox and recordings. Default: $STATE_DIRECTORY under systemd, else "
        "$XDG_STATE_HOME/oteo/{instance} (~/.local/state/oteo/{instance}).",
    )
    outbox: OutboxSection = Field(default_factory=OutboxSection, description="Event outbox.")
    metrics: MetricsSection = Field(default_factory=MetricsSection, description="Metrics.")
    log: LogSection = Field(default_factory=LogSection, description="What is logged at INFO.")
    record: RecordSection = Field(
        default_factory=RecordSection, description="Recording of readings for retraining."
    )
    similar: SimilarSection = Field(
        default_factory=SimilarSection, description="Similar windows and seen-before episodes."
    )
    partitions: PartitionsSection = Field(
        default_factory=PartitionsSection,
        description="Streams partitioned over instances by the broker (NATS subject mapping).",
    )

    @model_validator(mode="before")
    @classmethod
    def _instance_per_index(cls, data: Any) -> Any:
        # Two instances of a systemd template unit on one box share the host name: their
        # client ids (`oteo-{instance}`) would take each other's session, their state_dir the
        # same outbox. The partition index tells them apart.
        if isinstance(data, dict) and "instance" not in data:
            part = data.get("partitions")
            index = part.get("index") if isinstance(part, dict) else None
            if type(index) is int:
                return {**data, "instance": f"{socket.gethostname()}-{index}"}
        return data

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir_default(cls, value: object, info: ValidationInfo) -> object:
        if value is not None:
            return value
        instance = info.data.get("instance")
        return default_state_dir(instance if isinstance(instance, str) else socket.gethostname())

    @model_validator(mode="after")
    def _partitions_need_v311(self) -> Config:
        if self.partitions.enabled and self.mqtt.protocol != "3.1.1":
            # nats-server's MQTT listener refuses MQTT 5; partition sessions are 3.1.1 anyway.
            raise ValueError('partitions need mqtt.protocol = "3.1.1" (nats-server speaks 3.1.1)')
        return self

    def check_secrets(self) -> None:
        """Raise ConfigError unless every secret file is readable and not readable by all.

        Start-up, reload and check-config call it; the values are read again where used.
        """
        self.mqtt.password()
        self.http.token()

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, safe to print (no secrets)."""
        data = self.model_dump(mode="json")
        source = None
        if self.mqtt.password_file is not None:
            source = "<redacted: read from password_file>"
        elif os.environ.get(PASSWORD_ENV):
            source = f"<redacted: read from ${PASSWORD_ENV}>"
        data["mqtt"]["password"] = source
        return data


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a config file (None: defaults), then apply dotted-key overrides.

    Overrides (`{"model.path": ..., "http.port": ...}`) win over the file; None values are
    ignored so CLI options that were not given can be passed through as they are.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from exc


# Overrides of the detection stages (daemon.detector.Stages.overridden), not of the policy.
MOVING = (
    "baseline_samples",
    "new_level_s",
    "warmup_s",
    "warmup_factor",
    "baseline_learns_accepted",
)


def apply_alarm_overrides(policy: AlarmPolicy, alarm: AlarmSection) -> AlarmPolicy:
    """The manifest's alarm policy with the config's overrides applied and checked again."""
    changes = alarm.model_dump(exclude={"sensitivity", *MOVING}, exclude_none=True)
    try:
        return AlarmPolicy.model_validate({**policy.model_dump(), **changes})
    except ValidationError as exc:
        # The other half of a conflict may be the model's own value: say which are overrides.
        whose = f"the model's alarm policy with {', '.join(sorted(changes))} from the config"
        raise ConfigError(f"{_one_line(exc, 'alarm')} ({whose})") from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is not a section (override {key})")
        node = child
    node[leaf] = value


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required"}


def _one_line(exc: ValidationError, prefix: str = "") -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = _MESSAGES.get(first["type"], first["msg"]).removeprefix("Value error, ")
    more = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'config'}: {message}{more}"
