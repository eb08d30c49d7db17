"""Value types and checks shared by the config sections: paths, topic ids, secret files.

Paths may use `~` and environment variables (`${CREDENTIALS_DIRECTORY}/mqtt-password`);
relative ones are relative to the working directory, as on the command line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Strict

_UNSET_VAR = re.compile(r"\$\{?(\w+)")

# Container secret mounts (Docker/Compose `secrets:`): only the container's own processes see
# them, and a bind-mounted file keeps the host's mode, so "others" is not a meaningful boundary.
CONTAINER_SECRETS = Path("/run/secrets")


class ConfigError(ValueError):
    """The configuration is invalid; the message is one line, `path.to.field: message`."""


def read_secret(field: str, path: Path) -> str:
    """A secret file's text; refused when other users may read it, as ssh does with keys."""
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IROTH and not path.resolve().is_relative_to(CONTAINER_SECRETS):
            raise ConfigError(
                f"{field}: {path} is readable by every user (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod o-rwx {path}` (or hand it over with systemd LoadCredential=)"
            )
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc


def _expand(path: Path) -> Path:
    """Expand `~` and environment variables; an unset variable is an error, not a literal."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    unset = _UNSET_VAR.search(expanded)
    if unset:
        raise ValueError(f"environment variable {unset.group(1)} is not set")
    return Path(expanded)


# TOML has no path type: a path is a string, the one conversion the strict config allows.
FilePath = Annotated[Path, Strict(False), AfterValidator(_expand)]


def default_state_dir(instance: str) -> Path:
    """$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/oteo/{instance}.

    Per instance: two daemons on one host must not share an outbox.
    """
    # systemd's StateDirectory= may list several directories, colon-separated: use the first.
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "oteo" / instance
    try:
        home = Path.home()
    except RuntimeError as exc:
        raise ValueError("no home directory for the default: set state_dir") from exc
    return home / ".local" / "state" / "oteo" / instance


def _topic_id(value: str) -> str:
    if not value or re.search(r"[+#/\s]", value):
        raise ValueError(f"{value!r} must be non-empty, without + # / or whitespace")
    return value


def _topic_prefix(value: str) -> str:
    if not value or re.search(r"[+#\s]", value) or "" in value.split("/"):
        raise ValueError(f"{value!r} must be topic levels without + # whitespace or empty levels")
    return value


TopicId = Annotated[str, AfterValidator(_topic_id)]
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other host name counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
