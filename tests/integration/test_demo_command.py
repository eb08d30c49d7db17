"""`oteo demo` end to end: a real broker, daemon and simulator, stopped cleanly, nothing left.

The demo prints its children's pids and its temporary directory (every child's command line
names it); after the demo exits, no process may still run with that directory in its command
line, none of the printed pids may still be that process, and the directory must be gone.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from training import demo_view as view
from training.demo import DemoError, choose_broker, mosquitto_binary

HEADER = re.compile(r"^processes (?P<pids>.+); files in (?P<dir>\S+)$", re.M)
METRICS_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/metrics")


def oteo(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("oteo")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from daemon.cli import main; main()", *args]


class DemoProcess:
    """`oteo demo` with its output read line by line on a thread (so the test can react)."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.proc = subprocess.Popen(
            oteo("demo", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # so that the test's own Ctrl-C never reaches it
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first line matching `pattern` (read so far or arriving within the time-out)."""
        regex = re.compile(pattern)
        for line in self.lines:
            if found := regex.search(line):
                return found
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if found := regex.search(line):
                return found
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-5000:]}")

    def finish(self, timeout_s: float) -> int:
        """Wait for exit (bounded) and read the rest of the output; the exit code."""
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"oteo demo did not exit within {timeout_s} s; output:\n{self.output[-5000:]}"
            ) from None
        self._reader.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def children(output: str) -> tuple[dict[str, int], Path]:
    """The pids and temp dir the demo printed."""
    found = HEADER.search(output)
    assert found, f"the demo did not print its processes; output:\n{output[-3000:]}"
    pids = {}
    for item in found["pids"].split(", "):
        name, _, pid = item.rpartition(" ")
        pids[name] = int(pid)
    assert set(pids) == {"broker", "daemon", "simulator"}, pids
    return pids, Path(found["dir"])


def leftovers(workdir: Path, pids: dict[str, int]) -> list[str]:
    """Processes still running that the demo started (cmdline names its temp dir)."""
    marker = str(workdir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {text}")
    for name, pid in pids.items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone
        if marker in cmdline or (name == "broker" and b"mosquitto" in cmdline):
            found.append(f"{name} {pid} still runs")
    return found


def assert_clean_exit(demo: DemoProcess, code: int) -> None:
    out = demo.output
    pids, workdir = children(out)
    assert code == 0, f"exit code {code}; output:\n{out[-5000:]}"
    assert not leftovers(workdir, pids), leftovers(workdir, pids)
    assert not workdir.exists(), f"{workdir} was not removed"
    assert "every process stopped, temporary files removed" in out, out[-3000:]


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(resp.status)


def test_embedded_broker_runs_an_anomaly_through_and_leaves_nothing() -> None:
    if importlib.util.find_spec("amqtt") is None:
        pytest.fail(
            "amqtt is not installed: CI must install the [demo] extra "
            "(pip install -e '.[demo]') for the embedded-broker demo"
        )
    demo = DemoProcess(
        "--no-view",
        "--duration",
        "40",
        "--streams",
        "3",
        "--rate",
        "20",
        "--force-embedded-broker",
        "--http-port",
        "0",
    )
    try:
        metrics = demo.wait_for(r"^metrics\s+" + METRICS_URL.pattern, timeout_s=45)
        # The printed URL is the daemon's, and it answers while the demo runs.
        assert get(metrics.group(0).split()[-1]) == 200
        demo.wait_for(r"^processes ", timeout_s=5)
        demo.wait_for(r"\] sim-\d anomaly start ", timeout_s=30)
        demo.wait_for(r"\] sim-\d anomaly end ", timeout_s=30)
        code = demo.finish(timeout_s=40)
    finally:
        demo.kill()
    out = demo.output
    assert 'mqtt.protocol = "3.1.1"' in out, out[:2000]
    assert "MQTT v5 request/response for ops" in out
    assert "`reply_to`" in out
    assert "embedded amqtt broker, MQTT 3.1.1" in out
    assert "--duration 40 s elapsed" in out
    assert_clean_exit(demo, code)


@pytest.mark.skipif(mosquitto_binary() is None, reason="Mosquitto is not installed")
def test_mosquitto_demo_stops_cleanly_on_ctrl_c() -> None:
    demo = DemoProcess("--no-view", "--streams", "3", "--http-port", "0")
    try:
        demo.wait_for(r"^broker\s+mqtt://127\.0\.0\.1:\d+\s+\(Mosquitto .*MQTT 5\)", 20)
        demo.wait_for(r"^metrics\s+" + METRICS_URL.pattern, timeout_s=30)
        demo.wait_for(r"\] sim-\d anomaly start ", timeout_s=30)
        demo.proc.send_signal(signal.SIGINT)
        code = demo.finish(timeout_s=30)
    finally:
        demo.kill()
    out = demo.output
    assert "3.1.1" not in out, out[:2000]
    assert "stopped (Ctrl-C)" in out, out[-2000:]
    assert_clean_exit(demo, code)


def test_without_any_broker_one_line_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "amqtt" else real_find_spec(name, *a),
    )
    with pytest.raises(DemoError) as err:
        choose_broker(force_embedded=True)
    message = str(err.value)
    assert "pip install 'oteo[demo]'" in message and "Mosquitto" in message
    assert "\n" not in message


def test_view_renders_scores_states_and_events() -> None:
    rows = [
        view.StreamRow("sim-0", "normal", 0.01, 0.02),
        view.StreamRow("sim-1", "anomalous", 0.2, 0.02),
        view.StreamRow("sim-2"),
    ]
    event = view.EventLine.from_payload(
        {
            "kind": "start",
            "stream": "sim-1",
            "score": 0.2,
            "threshold": 0.02,
            "peak_score": 0.2,
            "top_channels": [{"channel": "pressure_bar", "contribution": 0.9, "direction": "high"}],
        },
        elapsed_s=5.2,
    )
    line = view.format_event(event)
    assert line == (
        "[0:05] sim-1 anomaly start  score 0.2 = 10.0× threshold  top: pressure_bar 90% high"
    )
    screen = view.render(["header"], rows, [event], width=100, height=20, colour=False)
    assert screen.startswith(view.HOME) and "\x1b[31m" not in screen
    lines = screen.split("\n")
    sim0 = next(x for x in lines if x.startswith("sim-0"))
    sim1 = next(x for x in lines if x.startswith("sim-1"))
    assert "normal" in sim0 and "0.50×" in sim0 and "|" in sim0
    assert (
        "anomalous" in sim1
        and "10.00×" in sim1
        and sim1.removesuffix(view.CLEAR_LINE).endswith(">]")
    )
    assert any("anomaly start" in x for x in lines)
    coloured = view.render(["header"], rows, [event], width=100, height=20, colour=True)
    assert view.RED in coloured and view.GREEN in coloured
