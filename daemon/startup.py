"""Start-up checks: everything `oteo run` refuses to start with, shared with `oteo check-config`.

In order: the config file, its secret and TLS files, the model file, then what needs both: the
config's alarm overrides against the model's own alarm policy. A refusal is a ConfigError or a
ModelFileError (`REFUSALS`) with a one-line message. The daemon runs the same checks on every
reload; a failed reload keeps the old model serving. At start-up, `startup_step` turns a
refusal into a StartupError, which is also how the daemon's own parts (its state directory, its
HTTP port) refuse to start.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import Config, ConfigError, MqttSection, apply_alarm_overrides, load_config
from daemon.manifest import AlarmPolicy
from daemon.model import Model, ModelFileError

REFUSALS = (ConfigError, ModelFileError)
_T = TypeVar("_T")


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line naming what and how to fix it."""


def startup_step(build: Callable[[], _T]) -> _T:
    """Run a start-up step; a config or model-file problem becomes one StartupError line."""
    try:
        return build()
    except REFUSALS as exc:
        raise StartupError(str(exc)) from exc


@dataclass(frozen=True)
class Startup:
    """A configuration that passed every start-up check, with its model and alarm policy."""

    cfg: Config
    model: Model
    policy: AlarmPolicy  # the model's, with the config's overrides applied

    def overridden(self) -> list[str]:
        """Alarm policy fields the config sets (the rest are the model's)."""
        return sorted(self.cfg.alarm.model_dump(exclude={"sensitivity"}, exclude_none=True))


def load_startup(config_path: Path | None, overrides: dict[str, Any] | None = None) -> Startup:
    """Read the config file (with dotted-key overrides) and run every start-up check on it."""
    return check_startup(load_config(config_path, overrides))


def check_startup(cfg: Config) -> Startup:
    """Check secrets, TLS files, the model file and what needs the model; raise a REFUSAL."""
    cfg.check_secrets()
    check_tls_files(cfg.mqtt)
    model = Model.load(
        cfg.model.path, threads=cfg.model.onnx_threads, expected_sha256=cfg.model.sha256
    )
    policy = apply_alarm_overrides(model.manifest.alarm, cfg.alarm)
    return Startup(cfg, model, policy)


def check_tls_files(mqtt: MqttSection) -> None:
    """Load the CA bundle and client certificate as the MQTT link will, to fail at start-up."""
    if not mqtt.tls:
        return
    if mqtt.key_file is not None and mqtt.cert_file is None:
        raise ConfigError("mqtt.key_file: set cert_file too (the certificate this key belongs to)")
    try:
        context = ssl.create_default_context(
            cafile=str(mqtt.ca_file) if mqtt.ca_file is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.ca_file: cannot load {mqtt.ca_file}: {_reason(exc)}") from exc
    if mqtt.cert_file is None:
        return
    try:
        context.load_cert_chain(mqtt.cert_file, mqtt.key_file)
    except (OSError, ssl.SSLError) as exc:
        key = f" with key {mqtt.key_file}" if mqtt.key_file is not None else ""
        raise ConfigError(
            f"mqtt.cert_file: cannot load {mqtt.cert_file}{key}: {_reason(exc)}"
        ) from exc


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) or not exc.strerror:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return exc.strerror
