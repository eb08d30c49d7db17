"""systemd notifications (READY, WATCHDOG, STOPPING, STATUS) over $NOTIFY_SOCKET, stdlib only."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams when started by systemd; does nothing otherwise."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr:
            # A leading "@" names a socket in the abstract namespace.
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the deadline, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if watchdog else None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *lines: str) -> None:
        if self._addr is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")
