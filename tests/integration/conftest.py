"""A real Mosquitto per test: loopback only, a free port, a config and a log in tmp_path."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from fault_kit import Fleet

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "mosquitto not found on PATH or in /usr/sbin: install Debian's mosquitto package"
        )
    return found


def _config_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Broker:
    """One Mosquitto process; `restart()` keeps its port, config and persistence directory."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, port: int, conf: dict[str, object]) -> None:
        self.port = port
        self.directory = directory
        self.conf_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        settings: dict[str, object] = {
            "allow_anonymous": True,
            # We run as root: without this Mosquitto drops to user `mosquitto`, which cannot
            # write tmp_path, and persistence fails silently.
            "user": "root",
            "persistence": True,
            "persistence_location": f"{directory}/",
            "autosave_interval": 1,
            "max_queued_messages": 100000,
            "log_dest": "stderr",
        }
        settings.update(conf)
        lines = [f"listener {port} {self.host}"]
        lines += [f"{key} {_config_value(value)}" for key, value in settings.items()]
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start Mosquitto and wait (bounded) until the port accepts connections."""
        assert not self.running, "already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self._proc.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop(kill=True)
        pytest.fail(f"mosquitto did not listen on {self.port} in {START_TIMEOUT_S} s")

    def pause(self) -> None:
        """SIGSTOP: the broker reads nothing until `stop` (SIGKILL ends a stopped process)."""
        assert self._proc is not None and self._proc.poll() is None
        self._proc.send_signal(signal.SIGSTOP)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Mosquitto saves its persistence database) or SIGKILL, then wait."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self._proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(STOP_TIMEOUT_S)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    """make_broker(start=True, port=None, **conf): extra conf lines such as password_file=…"""
    brokers: list[Broker] = []

    def make(*, start: bool = True, port: int | None = None, **conf: Any) -> Broker:
        directory = tmp_path / f"broker{len(brokers)}"
        directory.mkdir()
        broker = Broker(directory, port if port is not None else free_port(), conf)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(make_broker: BrokerFactory) -> Broker:
    """A running Mosquitto with anonymous access and persistence."""
    return make_broker()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Daemons as subprocesses (`fault_kit.Fleet`), all killed at the end of the test."""
    made = Fleet(tmp_path)
    yield made
    made.close()
