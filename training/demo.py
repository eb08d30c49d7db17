"""`oteo demo`: a broker, the daemon, simulated pumps and a live view, in one command.

Every part runs as its own process in its own session (process group), so Ctrl-C reaches only
this process, which then stops the others in order: simulator, daemon (SIGTERM, it flushes and
exits 0), broker. Each is terminated, waited for, and killed only as a last resort; a child
also gets SIGTERM from the kernel if this process dies without cleaning up (PR_SET_PDEATHSIG).
Every child's command line names the demo's temporary directory, which is removed at the end.

The broker is Mosquitto when installed, otherwise the embedded amqtt broker (the `[demo]`
extra), which speaks MQTT 3.1.1 only. The simulator is a child of this module rather than
`oteo simulate`: it must also speak 3.1.1, and it plays the pumps continuously (one machine
state, data time always advancing) while repeating a fault schedule every cycle.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from training import demo_view as view

INSTANCE = "demo"
HOST = "127.0.0.1"
BROKER_START_S = 10.0
DAEMON_READY_S = 40.0
STOP_WAIT_S = 5.0
DAEMON_STOP_WAIT_S = 20.0
REFRESH_S = 0.5
PLAIN_STATUS_S = 10.0
LOG_TAIL_LINES = 25

# The simulated machines play this many samples per cycle, then the schedule repeats.
CYCLE_ROWS = 600
PR_SET_PDEATHSIG = 1

V311_NOTICE = """\
note: MQTT 3.1.1 — the embedded amqtt broker speaks only 3.1.1, so the daemon runs with
      mqtt.protocol = "3.1.1". That turns off:
      - MQTT v5 request/response for ops: requests on oteo/ops/demo/{op} carry a `reply_to`
        field instead of a response topic and correlation data
      - session expiry interval: mqtt.session_expiry_s is not sent; the broker alone decides
        how long it keeps the daemon's session and queued readings
      - receive maximum flow control: the broker is not told how many unacknowledged readings
        the daemon can take at once
      - reason codes and properties in CONNACK/SUBACK/DISCONNECT (less precise errors)
      Install Mosquitto (e.g. apt install mosquitto) for the MQTT 5 path."""


@dataclass(frozen=True)
class DemoFault:
    """A fault the simulator injects into one stream every cycle (rows = samples)."""

    stream_index: int
    kind: str
    start_row: int
    rows: int


def demo_faults(streams: int) -> list[DemoFault]:
    """The schedule: each fault makes one alarm start within ~0.2 s and end within ~2 s of the
    fault ending (checked offline with the demo model); at 20 readings/s the first alarm starts
    5 s in and the second ends by ~27 s, in a 30 s cycle."""
    last = streams - 1
    return [
        DemoFault(min(1, last), "level_shift", 100, 160),
        DemoFault(min(2, last), "noise_burst", 340, 160),
    ]


@dataclass(frozen=True)
class SimulatorPlan:
    url: str
    protocol: str  # "5" or "3.1.1"
    streams: int
    rate_hz: float
    period_s: float
    seed: int
    faults: list[dict[str, Any]]
    prefix: str = "sensors"
    qos: int = 1


class DemoError(RuntimeError):
    """The demo cannot go on; the message is one line, the log (if any) says more."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class Interrupted(Exception):
    """A stop signal arrived while starting up."""


class StopFlag:
    """Set by SIGINT, SIGTERM or SIGHUP; read by the main loop."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    def check(self) -> None:
        if self.reason is not None:
            raise Interrupted(self.reason)


# -- child processes ---------------------------------------------------------------------------


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For the child before exec: SIGTERM when the demo dies (even by SIGKILL)."""

    def arm() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the demo died before the signal was armed
            os._exit(1)

    return arm


class Child:
    """One child process in its own session; its output goes to a log file in the temp dir."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the demo only
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_WAIT_S) -> int | None:
        """SIGTERM the process group, wait, SIGKILL as a last resort; the exit code."""
        code = self.proc.poll()
        if code is None:
            self._signal_group(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                code = self.proc.wait(STOP_WAIT_S)
        # Anything the child left in its group goes too.
        self._signal_group(signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return code

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _python(*code_and_args: str) -> list[str]:
    return [sys.executable, "-c", *code_and_args]


def _oteo(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("oteo")
    if script.exists():
        return [str(script), *args]
    return _python("from daemon.cli import main; main(prog_name='oteo')", *args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _wait(
    what: str,
    ready: Callable[[], bool],
    child: Child,
    timeout_s: float,
    stop: StopFlag,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stop.check()
        if not child.running():
            raise DemoError(
                f"the {child.name} exited with code {child.proc.returncode} before {what}",
                child.log_path,
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"the {child.name} did not get {what} within {timeout_s:g} s", child.log_path
            )
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_get(url: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


# -- broker ------------------------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


@dataclass
class BrokerChoice:
    kind: str  # "mosquitto" or "amqtt"
    binary: str | None

    @property
    def protocol(self) -> str:
        return "5" if self.kind == "mosquitto" else "3.1.1"

    @property
    def description(self) -> str:
        if self.kind == "mosquitto":
            return f"Mosquitto {self.binary}, MQTT 5"
        return "embedded amqtt broker, MQTT 3.1.1"


def choose_broker(force_embedded: bool) -> BrokerChoice:
    binary = None if force_embedded else mosquitto_binary()
    if binary is not None:
        return BrokerChoice("mosquitto", binary)
    if importlib.util.find_spec("amqtt") is None:
        why = "--force-embedded-broker needs" if force_embedded else "no Mosquitto found; install"
        raise DemoError(
            f"{why} the embedded broker: pip install 'oteo[demo]' "
            "(or install Mosquitto, e.g. apt install mosquitto)"
        )
    return BrokerChoice("amqtt", None)


def start_broker(choice: BrokerChoice, port: int, workdir: Path) -> Child:
    log_path = workdir / "broker.log"
    if choice.kind == "mosquitto":
        assert choice.binary is not None
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {HOST}\n"
            # As root Mosquitto would switch to user `mosquitto`, and a credential change
            # clears the parent-death signal: stay the current user.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n",
            encoding="utf-8",
        )
        return Child("broker (Mosquitto)", [choice.binary, "-c", str(conf)], log_path)
    code = "from training.demo import embedded_broker_main; embedded_broker_main()"
    return Child("broker (amqtt)", _python(code, HOST, str(port), str(workdir)), log_path)


def embedded_broker_main() -> None:
    """The amqtt broker child: `python -c ... HOST PORT WORKDIR`; SIGTERM/SIGINT stop it."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    host, port = sys.argv[1], int(sys.argv[2])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, stopped.set)
        await stopped.wait()
        await broker.shutdown()

    asyncio.run(serve())


# -- simulator ---------------------------------------------------------------------------------


def simulator_main() -> None:
    """The simulator child: `python -c ... PLAN.json`; plays the pumps until SIGTERM."""
    import numpy as np
    import paho.mqtt.client as mqtt

    from training.fault import inject
    from training.simulator import CHANNELS, MachineSimulator, reference_scales

    plan = SimulatorPlan(**json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
    faults = [DemoFault(**f) for f in plan.faults]
    stopping = False

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_stop)

    sims = [MachineSimulator(plan.seed + i, plan.period_s) for i in range(plan.streams)]
    scales = reference_scales(0, plan.period_s)
    host, _, port = plan.url.removeprefix("mqtt://").rpartition(":")
    protocol = mqtt.MQTTv5 if plan.protocol == "5" else mqtt.MQTTv311
    # paho from this one thread only: publish and loop in turn (see training/publisher.py).
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="oteo-demo-simulator", protocol=protocol
    )
    unacked: set[int] = set()
    client.on_publish = lambda _c, _u, mid, *_: unacked.discard(mid)
    client.connect(host, int(port), keepalive=30)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        client.loop(timeout=0.1)
        if time.monotonic() > deadline:
            sys.exit(f"simulator: no CONNACK from {plan.url} within 10 s")
    t0_data = time.time()
    t_start = time.monotonic()
    row = 0
    cycle = 0
    while not stopping:
        block = [sim.step(CYCLE_ROWS) for sim in sims]
        for k, fault in enumerate(faults):
            rng = np.random.default_rng([plan.seed, cycle, k])
            i = fault.stream_index
            block[i], _ = inject(
                block[i], fault.kind, fault.start_row, fault.rows, rng, scales=scales
            )
        for r in range(CYCLE_ROWS):
            if stopping:
                break
            ts = t0_data + row * plan.period_s
            for i, values in enumerate(block):
                payload = {
                    "ts": ts,
                    "seq": row,
                    "values": dict(zip(CHANNELS, values[r].round(5).tolist(), strict=True)),
                }
                info = client.publish(
                    f"{plan.prefix}/sim-{i}/data", json.dumps(payload), qos=plan.qos
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    sys.exit(f"simulator: publish failed ({mqtt.error_string(info.rc)})")
                if plan.qos:
                    unacked.add(info.mid)
            client.loop(timeout=0.0)
            row += 1
            due = t_start + row / plan.rate_hz
            while not stopping and (wait := due - time.monotonic()) > 0:
                client.loop(timeout=min(wait, 0.05))
            if not client.is_connected():
                sys.exit("simulator: lost the broker connection")
        cycle += 1
    deadline = time.monotonic() + 2
    while unacked and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    client.loop(timeout=0.1)
    print(f"simulator: published {row * plan.streams} readings", flush=True)


# -- daemon ------------------------------------------------------------------------------------


def demo_model_path() -> Path:
    """models/demo.onnx of the source tree this package is installed from."""
    import training

    return Path(training.__file__).resolve().parents[1] / "models" / "demo.onnx"


def _toml(doc: dict[str, Any]) -> str:
    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        return json.dumps(str(value))

    lines = [f"{k} = {scalar(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {scalar(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def write_daemon_config(
    workdir: Path, model: Path, broker_url: str, protocol: str, http_port: int
) -> Path:
    """The daemon's config file, validated here first by the daemon's own loader."""
    from daemon.config import ConfigError, load_config

    doc = {
        "instance": INSTANCE,
        "state_dir": str(workdir / "state"),
        "model": {"path": str(model)},
        "mqtt": {
            "url": broker_url,
            "protocol": protocol,
            "keepalive_s": 10,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 2.0,
        },
        "http": {"bind": HOST, "port": http_port},
        # The simulator fast-forwards data time (rate x the sample period): a long demo runs
        # days ahead of this host's clock, which the daemon would otherwise refuse.
        "ingest": {"max_future_s": 10 * 365 * 86400.0},
    }
    path = workdir / "oteo.toml"
    path.write_text(_toml(doc), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        raise DemoError(f"demo config {path}: {exc}") from exc
    return path


def _metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            with contextlib.suppress(ValueError):
                return float(line.split()[1])
    return None


# -- watching the daemon -----------------------------------------------------------------------


class Watcher:
    """A paho subscriber on `oteo/#` (its own network thread: it never publishes)."""

    def __init__(self, port: int, protocol: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._subscribed = False
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"oteo-demo-view-{os.getpid()}",
            protocol=version,
        )
        self.client.on_connect = lambda c, *_: c.subscribe([("oteo/#", 1)])
        self.client.on_subscribe = lambda *_: setattr(self, "_subscribed", True)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(
            (msg.topic, bytes(msg.payload))
        )
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()

    def wait_subscribed(self, child: Child, stop: StopFlag) -> None:
        _wait("a subscription on oteo/#", lambda: self._subscribed, child, 10.0, stop)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Tally:
    starts: int = 0
    ends: int = 0
    updates: int = 0
    readings: float | None = None
    windows: float | None = None


class Screen:
    """Either the live ANSI view or plain lines (--no-view, or when stdout is no terminal)."""

    def __init__(self, live: bool, header: list[str], streams: int) -> None:
        self.live = live
        self.colour = live and os.environ.get("NO_COLOR") is None
        self.header = header
        self.status = ""
        self.rows = {f"sim-{i}": view.StreamRow(f"sim-{i}") for i in range(streams)}
        self.events: list[view.EventLine] = []
        self._entered = False

    def say(self, line: str = "") -> None:
        """A line for plain output (in live mode it only shows after the view closes)."""
        if not self.live:
            click.echo(line)

    def enter(self) -> None:
        if self.live and not self._entered:
            sys.stdout.write(view.ENTER_SCREEN)
            sys.stdout.flush()
            self._entered = True

    def leave(self) -> None:
        if self._entered:
            sys.stdout.write(view.LEAVE_SCREEN)
            sys.stdout.flush()
            self._entered = False

    def event(self, event: view.EventLine) -> None:
        self.events.append(event)
        del self.events[:-200]
        if not self.live:
            click.echo(view.format_event(event))

    def draw(self) -> None:
        if not self._entered:
            return
        size = shutil.get_terminal_size((100, 30))
        header = [*self.header, self.status]
        text = view.render(
            header,
            list(self.rows.values()),
            self.events,
            width=size.columns,
            height=size.lines,
            colour=self.colour,
        )
        sys.stdout.write(text)
        sys.stdout.flush()


# -- the command -------------------------------------------------------------------------------


@click.command()
@click.option(
    "--streams",
    default=4,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Simulated pumps (streams sim-0..N-1).",
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.5, 1000),
    help="Readings per second per stream; each advances the pump by one 1 s sample.",
)
@click.option(
    "--duration",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to run; 0 runs until Ctrl-C.",
)
@click.option(
    "--broker-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Broker port on 127.0.0.1 (0: any free port).",
)
@click.option(
    "--http-port",
    default=9108,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Daemon HTTP port on 127.0.0.1 (/metrics); a free one if taken or 0.",
)
@click.option("--no-view", is_flag=True, help="Print plain event lines instead of the live view.")
@click.option(
    "--force-embedded-broker",
    is_flag=True,
    help="Use the embedded amqtt broker (MQTT 3.1.1) even if Mosquitto is installed.",
)
def demo(
    streams: int,
    rate: float,
    duration: float,
    broker_port: int,
    http_port: int,
    no_view: bool,
    force_embedded_broker: bool,
) -> None:
    """Run everything on this machine: broker, simulated pumps, the daemon and a live view.

    Ctrl-C stops every process it started and removes its temporary files.
    """
    stop = StopFlag()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = _run(
            streams, rate, duration, broker_port, http_port, no_view, force_embedded_broker, stop
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    sys.exit(code)


def _run(
    streams: int,
    rate: float,
    duration: float,
    broker_port: int,
    http_port: int,
    no_view: bool,
    force_embedded: bool,
    stop: StopFlag,
) -> int:
    try:
        model = demo_model_path()
        if not model.is_file():
            raise DemoError(
                f"the demo model is missing: {model} (oteo demo runs from a source checkout: "
                "pip install -e '.[demo]' in the repository)"
            )
        choice = choose_broker(force_embedded)
    except DemoError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    if broker_port == 0:
        broker_port = _free_port()
    elif not _port_free(broker_port):
        click.echo(f"error: --broker-port {broker_port} is in use on {HOST}", err=True)
        return 1
    requested_http = http_port
    if http_port == 0 or not _port_free(http_port):
        http_port = _free_port()

    live = not no_view and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    workdir = Path(tempfile.mkdtemp(prefix="oteo-demo-"))
    children: dict[str, Child] = {}
    watcher: Watcher | None = None
    screen: Screen | None = None
    tally = Tally()
    code = 0
    reason = "error"
    t_run: float | None = None
    broker_url = f"mqtt://{HOST}:{broker_port}"
    base = f"http://{HOST}:{http_port}"
    try:
        if choice.protocol == "3.1.1":
            click.echo(V311_NOTICE)
        if requested_http not in (0, http_port):
            click.echo(f"note: port {requested_http} is taken; the daemon listens on {http_port}")
        children["broker"] = broker = start_broker(choice, broker_port, workdir)
        _wait("its port open", lambda: _accepts(broker_port), broker, BROKER_START_S, stop)

        config = write_daemon_config(workdir, model, broker_url, choice.protocol, http_port)
        children["daemon"] = daemon = Child(
            "daemon", _oteo("run", "--config", str(config)), workdir / "daemon.log"
        )
        _wait(
            "ready (/readyz)",
            lambda: _http_get(base + "/readyz")[0] == 200,
            daemon,
            DAEMON_READY_S,
            stop,
        )

        faults = demo_faults(streams)
        plan = SimulatorPlan(
            url=broker_url,
            protocol=choice.protocol,
            streams=streams,
            rate_hz=rate,
            period_s=1.0,
            seed=1,
            faults=[asdict(f) for f in faults],
        )
        plan_path = workdir / "simulator.json"
        plan_path.write_text(json.dumps(asdict(plan)), encoding="utf-8")
        # The watcher's paho thread starts after the last child: no fork while threads run.
        code_line = "from training.demo import simulator_main; simulator_main()"
        children["simulator"] = Child(
            "simulator", _python(code_line, str(plan_path)), workdir / "simulator.log"
        )
        watcher = Watcher(broker_port, choice.protocol)
        watcher.wait_subscribed(broker, stop)
        t_run = time.monotonic()

        schedule = ", ".join(
            f"sim-{f.stream_index} {f.kind} {f.start_row / rate:g}–"
            f"{(f.start_row + f.rows) / rate:g} s"
            for f in faults
        )
        header = [
            f"oteo demo: {streams} simulated pump{'s' if streams > 1 else ''}, "
            f"{rate:g} readings/s each ({rate:g}× real time), model {model.name}",
            f"broker    {broker_url}  ({choice.description})",
            f"metrics   {base}/metrics   streams {base}/v1/streams",
            f"faults    {schedule}; repeating every {CYCLE_ROWS / rate:g} s",
            "processes "
            + ", ".join(f"{name} {c.pid}" for name, c in children.items())
            + f"; files in {workdir}",
        ]
        screen = Screen(live, header, streams)
        if not live:
            for line in header:
                click.echo(line)
        screen.enter()
        reason = _watch(screen, watcher, children, base, duration, t_run, tally, stop)
    except Interrupted as exc:
        reason = f"{exc} during start-up"
    except (DemoError, OSError) as exc:  # OSError: a child or a socket could not start
        code = 1
        if screen is not None:
            screen.leave()
        click.echo(f"error: {exc}", err=True)
        if isinstance(exc, DemoError) and exc.log_path is not None:
            _print_log(exc.log_path)
    finally:
        if screen is not None:
            screen.leave()
        code = max(code, _shut_down(children, watcher, base, tally, screen))
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_run if t_run is not None else 0.0
    _summary(reason, elapsed, tally, screen, code)
    return code


def _watch(
    screen: Screen,
    watcher: Watcher,
    children: dict[str, Child],
    base: str,
    duration: float,
    t_run: float,
    tally: Tally,
    stop: StopFlag,
) -> str:
    """The main loop: events as they come, the view 2×/s; returns why it stopped."""
    next_draw = next_metrics = 0.0
    next_plain = t_run + PLAIN_STATUS_S
    while True:
        now = time.monotonic()
        if stop.reason is not None:
            return stop.reason
        if duration > 0 and now - t_run >= duration:
            return f"--duration {duration:g} s elapsed"
        for child in children.values():
            if not child.running():
                raise DemoError(
                    f"the {child.name} exited unexpectedly with code {child.proc.returncode}",
                    child.log_path,
                )
        _take_messages(screen, watcher, tally, now - t_run, wait_s=0.1)
        if now >= next_metrics:
            next_metrics = now + 2.0
            _read_metrics(base, tally)
        if screen.live and now >= next_draw:
            next_draw = now + REFRESH_S
            _poll_streams(base, screen)
            screen.status = (
                f"running   {view.format_clock(now - t_run)}"
                + (f" of {view.format_clock(duration)}" if duration > 0 else "")
                + f" · {_count(tally.readings)} readings, {_count(tally.windows)} windows scored"
                + f" · {tally.starts} started, {tally.ends} ended · Ctrl-C stops"
            )
            screen.draw()
        if not screen.live and now >= next_plain:
            next_plain = now + PLAIN_STATUS_S
            _poll_streams(base, screen)
            states = ", ".join(
                f"{r.stream} {r.state}"
                + (f" {r.score / r.threshold:.2f}×" if r.score and r.threshold else "")
                for r in screen.rows.values()
            )
            screen.say(f"[{view.format_clock(now - t_run)}] {states}")


def _take_messages(
    screen: Screen, watcher: Watcher, tally: Tally, elapsed_s: float, wait_s: float
) -> None:
    try:
        topic, payload = watcher.messages.get(timeout=wait_s)
    except queue.Empty:
        return
    while True:
        _handle(screen, topic, payload, tally, elapsed_s)
        try:
            topic, payload = watcher.messages.get_nowait()
        except queue.Empty:
            return


def _handle(screen: Screen, topic: str, payload: bytes, tally: Tally, elapsed_s: float) -> None:
    parts = topic.split("/")
    if len(parts) != 3 or not payload:
        return
    try:
        doc = json.loads(payload)
    except ValueError:
        return
    if not isinstance(doc, dict):
        return
    stream, kind = parts[1], parts[2]
    try:
        if kind == "event":
            event = view.EventLine.from_payload(doc, elapsed_s)
            if event.kind == "start":
                tally.starts += 1
            elif event.kind == "end":
                tally.ends += 1
            else:
                tally.updates += 1
            screen.event(event)
        elif kind == "state" and stream in screen.rows:
            row = screen.rows[stream]
            row.state = str(doc.get("state", row.state))
            if doc.get("score") is not None:
                row.score = float(doc["score"])
            if doc.get("threshold") is not None:
                row.threshold = float(doc["threshold"])
    except (KeyError, TypeError, ValueError):
        return


def _poll_streams(base: str, screen: Screen) -> None:
    status, body = _http_get(base + "/v1/streams", timeout_s=1.0)
    if status != 200:
        return
    try:
        listing = json.loads(body)
    except ValueError:
        return
    for item in listing:
        stream = str(item.get("stream"))
        row = screen.rows.setdefault(stream, view.StreamRow(stream))
        row.state = str(item.get("state") or row.state)
        row.score = item.get("score")
        row.threshold = item.get("threshold")


def _read_metrics(base: str, tally: Tally) -> None:
    status, body = _http_get(base + "/metrics", timeout_s=1.0)
    if status == 200:
        text = body.decode("utf-8", errors="replace")
        tally.readings = _metric(text, "oteo_readings_total")
        tally.windows = _metric(text, "oteo_windows_scored_total")


def _shut_down(
    children: dict[str, Child],
    watcher: Watcher | None,
    base: str,
    tally: Tally,
    screen: Screen | None,
) -> int:
    """Stop everything in order; 1 if the daemon did not exit cleanly, else 0."""
    code = 0
    simulator = children.get("simulator")
    if simulator is not None:
        simulator.stop()
    daemon = children.get("daemon")
    if daemon is not None:
        was_running = daemon.running()  # else its end was reported already
        if was_running:
            time.sleep(0.3)  # let the daemon take the last readings before the final count
            _read_metrics(base, tally)
        exit_code = daemon.stop(DAEMON_STOP_WAIT_S)
        if was_running and exit_code != 0:
            click.echo(f"error: the daemon exited with code {exit_code}", err=True)
            _print_log(daemon.log_path)
            code = 1
    if watcher is not None:
        if screen is not None:
            _take_messages(screen, watcher, tally, _elapsed(screen), wait_s=0.2)
        watcher.close()
    broker = children.get("broker")
    if broker is not None:
        broker.stop()
    return code


def _elapsed(screen: Screen) -> float:
    return screen.events[-1].elapsed_s if screen.events else 0.0


def _summary(reason: str, elapsed_s: float, tally: Tally, screen: Screen | None, code: int) -> None:
    if screen is not None and screen.live:
        # The live view is gone: leave the events on the terminal.
        for event in screen.events[-20:]:
            click.echo(view.format_event(event))
    events = tally.starts + tally.ends + tally.updates
    click.echo(
        f"stopped ({reason}) after {view.format_clock(elapsed_s)}: "
        f"{events} anomaly event{'s' if events != 1 else ''} seen "
        f"({tally.starts} start, {tally.ends} end, {tally.updates} update); "
        f"readings scored {_count(tally.readings)}, windows scored {_count(tally.windows)}; "
        + ("every process stopped, temporary files removed" if code == 0 else "see errors above")
    )


def _count(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def _print_log(path: Path) -> None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    if lines:
        click.echo(f"--- last lines of {path.name} ---", err=True)
        for line in lines[-LOG_TAIL_LINES:]:
            click.echo(line, err=True)
