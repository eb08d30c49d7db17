"""`oteo benchmark throughput`: the daemon end to end against the transport and the model.

One run on loopback: a private Mosquitto, publisher processes (`training.bench.loadgen`), a bare
paho subscriber, and the real `oteo run` with a real config and the demo model, 100 streams,
hop 1, QoS 1.

Rates are measured by draining a backlog: the consumer (bare subscriber or daemon) creates its
persistent session, leaves, the publishers fill the session's queue at the broker with a fixed
number of readings, and the consumer comes back and takes them all. The publishers are done
before the consumer starts, so they cannot be the bottleneck (their own rate is reported), and
"nothing lost" is checked exactly: every reading published is counted by the daemon as taken
into a window buffer, and no message is counted as dropped. The consumer is pinned to one core
with `taskset -c 1` when taskset exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

STREAMS = 100
BATCH_READINGS = 100
PUBLISHERS = 2
BASE_TS = 1_700_000_000  # data time of reading 0 (in the past: max_future_s never applies)
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo.onnx"


@dataclass(frozen=True)
class Sizes:
    single_msgs_per_stream: int
    batched_msgs_per_stream: int
    latency_s: float
    # Between two /metrics scrapes of the draining daemon: a scrape costs it CPU (100 streams
    # of per-stream series), so rarely where drains are long.
    scrape_s: float

    @property
    def single_readings(self) -> int:
        return STREAMS * self.single_msgs_per_stream

    @property
    def batched_readings(self) -> int:
        return STREAMS * self.batched_msgs_per_stream * BATCH_READINGS


QUICK = Sizes(single_msgs_per_stream=150, batched_msgs_per_stream=5, latency_s=3.0, scrape_s=0.2)
# Full: each drain lasts about 30 s or more at the rates seen here (2 shared cores).
FULL = Sizes(single_msgs_per_stream=2000, batched_msgs_per_stream=100, latency_s=30.0, scrape_s=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def pinned(cmd: list[str], pin: bool = True) -> list[str]:
    """`cmd` on core 1 alone, when asked and this box has taskset and a second core."""
    if pin and can_pin():
        return ["taskset", "-c", "1", *cmd]
    return cmd


class Broker:
    """A private Mosquitto on a free loopback port; queues without limit for offline sessions."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        conf = directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # As root Mosquitto otherwise switches to user mosquitto, which cannot use our dir.
            "user root\n"
            "persistence false\n"
            # The backlog of a whole run waits at the broker: no per-client queue limits.
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._log = open(directory / "mosquitto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise click.ClickException(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


def loadgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.bench.loadgen", *args]


def run_json(cmd: list[str], timeout_s: float = 600) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd[:4])} failed: {done.stderr.strip()[-500:]}")
    doc: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return doc


def publish_all(
    port: int,
    series: Path,
    msgs_per_stream: int,
    batch: int,
    start: int,
    rate: float = 0.0,
    times_dir: Path | None = None,
    prefix: str = "sensors",
    fault_every: int = 0,
) -> dict[str, Any]:
    """Run the publisher processes to completion; streams are split between them."""
    share = STREAMS // PUBLISHERS
    procs = []
    for p in range(PUBLISHERS):
        cmd = loadgen(
            "publish",
            f"--port={port}",
            f"--series={series}",
            f"--first-stream={p * share}",
            f"--streams={share}",
            f"--per-stream={msgs_per_stream}",
            f"--batch={batch}",
            f"--start={start}",
            f"--base-ts={BASE_TS}",
            f"--rate={rate / PUBLISHERS}",
            f"--prefix={prefix}",
            f"--fault-every={fault_every}",
        )
        if times_dir is not None:
            cmd.append(f"--times={times_dir / f'pub{p}.npy'}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    docs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise click.ClickException("a publisher process failed")
        docs.append(json.loads(out.strip().splitlines()[-1]))
    sent = sum(d["sent"] for d in docs)
    acked = sum(d["acked"] for d in docs)
    if acked != sent:
        raise click.ClickException(f"the broker acknowledged {acked} of {sent} publications")
    elapsed = max(d["t_acked"] for d in docs) - min(d["t0"] for d in docs)
    return {"msgs": sent, "msgs_per_s": sent / elapsed, "readings_per_s": sent * batch / elapsed}


# -- the daemon --------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """oteo_* samples of one /metrics scrape, keyed `name{label="value",...}`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@dataclass
class Daemon:
    """`oteo run` as a subprocess with its own config, READY timed over a notify socket."""

    directory: Path
    broker_port: int
    pin: bool = True
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0

    def config(self) -> Path:
        path = self.directory / "oteo.toml"
        path.write_text(
            'instance = "bench"\n'
            f'state_dir = "{self.directory / "state"}"\n'
            f'[model]\npath = "{DEMO_MODEL}"\n'
            f'[mqtt]\nurl = "mqtt://127.0.0.1:{self.broker_port}"\n'
            f'[http]\nbind = "127.0.0.1"\nport = {self.http_port}\n'
            # Every stream here is new and the latency run lasts less than the model's warm-up
            # (300 s of data judged at 6x the thresholds): faults must alarm from the start.
            "[alarm]\nwarmup_s = 0\n"
        )
        return path

    def start(self) -> None:
        """Start and wait for READY=1 (model loaded, HTTP up), then for MQTT (/readyz)."""
        notify_path = self.directory / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        script = Path(sys.executable).with_name("oteo")
        cmd = [str(script), "run", "--config", str(self.config())]
        log = open(self.directory / "oteo.log", "ab")  # noqa: SIM115 - the child holds it
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(pinned(cmd, self.pin), env=env, stdout=log, stderr=log)
        log.close()
        notify.settimeout(30)
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
        except TimeoutError as exc:
            raise click.ClickException("the daemon did not send READY=1 in 30 s") from exc
        finally:
            notify.close()
        self.ready_s = time.perf_counter() - t0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz") as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise click.ClickException("the daemon did not connect to the broker in 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pid(self) -> int:
        """The daemon's own pid (under taskset it exec()s, so the same process)."""
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid()}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def drain(self, expected_readings: int, timeout_s: float, scrape_s: float) -> dict[str, float]:
        """Wait until the daemon took `expected_readings`; its rate while it was draining.

        The rate is taken between the first and the last scrape that saw the drain under way,
        so the scrape interval does not count as work (the final scrape if there was one).
        """
        polls: list[tuple[float, float, float]] = []  # time, readings, cpu s
        deadline = time.monotonic() + timeout_s
        while True:
            m = scrape(self.http_port)
            readings = m.get("oteo_readings_total", 0.0)
            sample = (time.perf_counter(), readings, self.cpu_s())
            if readings >= expected_readings or time.monotonic() > deadline:
                break
            if readings > 0:
                polls.append(sample)
            time.sleep(scrape_s)
        if readings < expected_readings:
            raise click.ClickException(
                f"the daemon took {readings:.0f} of {expected_readings} readings"
            )
        if len(polls) < 2:
            polls.append(sample)
        (t0, r0, c0), (t1, r1, c1) = polls[0], polls[-1]
        dropped = sum(
            v
            for k, v in m.items()
            if k.startswith("oteo_messages_total{") and 'result="ok"' not in k
        )
        return {
            "readings": readings,
            "samples_per_s": (r1 - r0) / max(t1 - t0, 1e-9),
            "seconds": t1 - t0,
            "cpu_s_per_1000": 1000 * (c1 - c0) / max(r1 - r0, 1),
            "dropped": dropped,
            "windows": m.get("oteo_windows_scored_total", 0.0),
            "inference_s": m.get("oteo_inference_duration_seconds_sum", 0.0),
            "batches": m.get("oteo_batch_size_windows_count", 0.0),
            "rss_mb": self.peak_rss_mb(),
        }


# -- the transport and the model alone ---------------------------------------------------------


def transport_limit(
    port: int, series: Path, sizes: Sizes, receive_max: int, pin: bool
) -> dict[str, float]:
    """A bare paho subscriber (pinned like the daemon) draining the same single-reading backlog."""
    client_id = f"bench-bare-{time.monotonic_ns()}"
    # Its own topics: the daemon's stopped session must not queue these as well.
    receive = ["receive", f"--port={port}", f"--client-id={client_id}", "--topic=bare/+/data"]
    run_json(loadgen(*receive, "--subscribe-only", f"--receive-max={receive_max}"))
    pub = publish_all(port, series, sizes.single_msgs_per_stream, 1, start=0, prefix="bare")
    expect = f"--expect={pub['msgs']}"
    doc = run_json(pinned(loadgen(*receive, expect, f"--receive-max={receive_max}"), pin))
    if doc["received"] != pub["msgs"]:
        raise click.ClickException(f"bare subscriber got {doc['received']} of {pub['msgs']}")
    return {
        "msgs_per_s": doc["received"] / max(doc["last"] - doc["first"], 1e-9),
        "publisher_msgs_per_s": pub["msgs_per_s"],
    }


def onnx_rate(batch: int, seconds: float = 1.0) -> float:
    """Windows/s of the demo model through onnxruntime alone, one thread, on core 1."""
    from daemon.model import Model

    model = Model.load(DEMO_MODEL, threads=1)
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(batch, model.window, model.channels)).astype(np.float32)
    pin = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    old = os.sched_getaffinity(0) if pin else None
    if pin:
        os.sched_setaffinity(0, {1})
    try:
        model.run(windows)
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.run(windows)
            runs += 1
        return runs * batch / (time.perf_counter() - t0)
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)


def peer_rates(batch: int, series: np.ndarray) -> dict[str, float | str]:
    """PyOD AutoEncoder and River HalfSpaceTrees on the same windows, when installed."""
    out: dict[str, float | str] = {}
    window = 32
    flat = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)
    flat = flat.reshape(len(flat), -1)[:2000].astype(np.float32)
    try:
        from pyod.models.auto_encoder import AutoEncoder
    except ImportError:
        out["pyod_ae_windows_per_s"] = "not installed"
    else:
        detector = AutoEncoder(epoch_num=1, verbose=0)
        detector.fit(flat)
        t0 = time.perf_counter()
        for i in range(0, len(flat), batch):
            detector.decision_function(flat[i : i + batch])
        out["pyod_ae_windows_per_s"] = len(flat) / (time.perf_counter() - t0)
    try:
        from river.anomaly import HalfSpaceTrees
    except ImportError:
        out["river_hst_samples_per_s"] = "not installed"
    else:
        lo, hi = series.min(axis=0), series.max(axis=0)
        rows = [
            {f"c{c}": float(v) for c, v in enumerate((r - lo) / (hi - lo + 1e-12))}
            for r in series[:5000]
        ]
        hst = HalfSpaceTrees(seed=0)
        t0 = time.perf_counter()
        for row in rows:
            hst.score_one(row)
            hst.learn_one(row)
        out["river_hst_samples_per_s"] = len(rows) / (time.perf_counter() - t0)
    return out


# -- latency -----------------------------------------------------------------------------------


def latency(
    directory: Path,
    port: int,
    series: Path,
    rate: float,
    seconds: float,
    start: int,
    bare: bool = False,
) -> dict[str, float]:
    """Reading published -> event received, at `rate` readings/s over 100 streams.

    Every 10th stream has recurring faults (loadgen FAULT_CYCLE); an event carries the time of
    the window that raised or ended the alarm, which is the timestamp of the reading that
    completed it, so each event maps back to one publication. With `bare`, the reference: the
    same publications to a bare paho subscriber (QoS 1, Receive Maximum 100, like the daemon),
    on topics of its own, reading published -> reading received, every reading.
    """
    prefix = "lat" if bare else "sensors"
    out = directory / ("readings.json" if bare else "events.json")
    listen_to = [f"--topic={prefix}/+/data", "--readings"] if bare else ["--topic=oteo/+/event"]
    listen = subprocess.Popen(
        loadgen("scores", f"--port={port}", *listen_to, f"--seconds={seconds}", f"--out={out}"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listen.stdout is not None
    listen.stdout.readline()  # subscribed
    # Long enough for the 32-sample warm-up and at least one fault cycle on every stream.
    per_stream = max(200, round(rate * seconds / STREAMS))
    publish_all(
        port,
        series,
        per_stream,
        1,
        start=start,
        rate=rate,
        times_dir=directory,
        prefix=prefix,
        fault_every=10,
    )
    listen.communicate(timeout=seconds + 60)
    sent_at = {}
    share = STREAMS // PUBLISHERS
    for p in range(PUBLISHERS):
        times = np.load(directory / f"pub{p}.npy")
        for i, t in enumerate(times.tolist()):
            k, s = divmod(i, share)
            sent_at[(f"s{p * share + s}", BASE_TS + start + k)] = t
    delays = [
        arrived - sent_at[(stream, round(ts))]
        for stream, ts, arrived in json.loads(out.read_text())
        if (stream, round(ts)) in sent_at
    ]
    if not delays:
        what = "reading" if bare else "event"
        raise click.ClickException(f"no {what} arrived for the latency measurement")
    ms = np.array(delays) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "samples": len(ms),
        "per_stream": per_stream,
    }


# -- the command -------------------------------------------------------------------------------


def drain(
    daemon: Daemon, port: int, series: Path, sizes: Sizes, batch: int, start: int, pin: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fill the stopped daemon's session with a backlog, start it, time how it takes it in."""
    per_stream = sizes.single_msgs_per_stream if batch == 1 else sizes.batched_msgs_per_stream
    readings = STREAMS * per_stream * batch
    pub = publish_all(port, series, per_stream, batch, start=start)
    daemon.pin = pin
    daemon.start()
    try:
        result = daemon.drain(readings, 60 + readings / 2000, sizes.scrape_s)
    finally:
        daemon.stop()
    return result, pub


def measure(directory: Path, sizes: Sizes, say: Any) -> dict[str, Any]:
    from training.simulator import MachineSimulator

    series = directory / "series.npy"
    values = MachineSimulator(1, 1.0).step(4000)
    np.save(series, values)
    broker = Broker(directory)
    daemon = Daemon(directory / "daemon", broker.port)
    daemon.directory.mkdir()
    try:
        say("transport limit: a bare paho subscriber drains the single-reading backlog")
        bare = transport_limit(broker.port, series, sizes, receive_max=100, pin=False)
        say("daemon: first start (READY time), then drain the single-reading backlog")
        daemon.start()
        ready_s = daemon.ready_s
        daemon.stop()
        start = 0
        single, pub_single = drain(daemon, broker.port, series, sizes, 1, start, pin=False)
        start += sizes.single_msgs_per_stream
        say("the same, both on one core (taskset -c 1)")
        bare_1 = transport_limit(broker.port, series, sizes, receive_max=100, pin=True)
        single_1, _ = drain(daemon, broker.port, series, sizes, 1, start, pin=True)
        start += sizes.single_msgs_per_stream
        say(f"daemon on one core: drain the batched backlog ({BATCH_READINGS} readings/message)")
        batched, pub_batched = drain(
            daemon, broker.port, series, sizes, BATCH_READINGS, start, pin=True
        )
        start += sizes.batched_msgs_per_stream * BATCH_READINGS
        rate = single["samples_per_s"] / 2
        say(f"latency at half the sustained rate ({rate:.0f} readings/s): publish -> event")
        daemon.pin = False
        daemon.start()
        lat = latency(daemon.directory, broker.port, series, rate, sizes.latency_s, start)
        start += lat["per_stream"]
        # The load generator shares the two cores: the same at a quarter shows where the tail
        # comes from (queueing near saturation, or the daemon itself).
        say(f"the same at a quarter of the sustained rate ({rate / 2:.0f} readings/s)")
        lat_quarter = latency(
            daemon.directory, broker.port, series, rate / 2, sizes.latency_s, start
        )
        rss_latency = daemon.peak_rss_mb()
        # The daemon's own part: the reading's arrival at its network thread -> event queued.
        m = scrape(daemon.http_port)
        own_count = m.get("oteo_event_latency_seconds_count", 0.0)
        own_fast = m.get('oteo_event_latency_seconds_bucket{le="0.025"}', 0.0)
        daemon.stop()
        say("the same publications to a bare paho subscriber: publish -> reading")
        lat_bare = latency(directory, broker.port, series, rate, sizes.latency_s, start, bare=True)
    finally:
        daemon.stop()
        broker.stop()
    say("onnxruntime alone, and the peers if installed")
    mean_batch = max(1, round(batched["windows"] / max(batched["batches"], 1)))
    mean_batch_single = max(1, round(single["windows"] / max(single["batches"], 1)))
    return {
        "transport_limit_msgs_per_s": bare["msgs_per_s"],
        "daemon_samples_per_s": single["samples_per_s"],
        "transport_limit_one_core_msgs_per_s": bare_1["msgs_per_s"],
        "daemon_one_core_samples_per_s": single_1["samples_per_s"],
        "daemon_batched_samples_per_s": batched["samples_per_s"],
        "latency_p50_ms": lat["p50_ms"],
        "latency_p99_ms": lat["p99_ms"],
        "latency_rate_per_s": rate,
        "latency_samples": lat["samples"],
        "latency_quarter_rate_per_s": rate / 2,
        "latency_quarter_p50_ms": lat_quarter["p50_ms"],
        "latency_quarter_p99_ms": lat_quarter["p99_ms"],
        "latency_own_events": own_count,
        "latency_own_under_25ms": own_fast,
        "latency_bare_p50_ms": lat_bare["p50_ms"],
        "latency_bare_p99_ms": lat_bare["p99_ms"],
        "rss_mb": max(single["rss_mb"], single_1["rss_mb"], batched["rss_mb"], rss_latency),
        "rss_mb_single": single["rss_mb"],
        "rss_mb_batched": batched["rss_mb"],
        "rss_mb_latency": rss_latency,
        "ready_s": ready_s,
        "cpu_s_per_1000_samples": single["cpu_s_per_1000"],
        "cpu_s_per_1000_samples_batched": batched["cpu_s_per_1000"],
        "readings_sent": 2 * sizes.single_readings + sizes.batched_readings,
        "readings_lost": int(
            2 * sizes.single_readings
            + sizes.batched_readings
            - sum(r["readings"] for r in (single, single_1, batched))
        ),
        "messages_dropped": int(sum(r["dropped"] for r in (single, single_1, batched))),
        "drain_seconds": single["seconds"],
        "drain_seconds_batched": batched["seconds"],
        "publisher_msgs_per_s": min(pub_single["msgs_per_s"], bare["publisher_msgs_per_s"]),
        "publisher_batched_readings_per_s": pub_batched["readings_per_s"],
        # Model runs inside the daemon (oteo_inference_duration_seconds, wall time) against
        # onnxruntime alone at the same mean batch size; on one core the daemon's other
        # threads share the core with its runs.
        "scoring_batch_windows": mean_batch,
        "daemon_onnx_windows_per_s": batched["windows"] / max(batched["inference_s"], 1e-9),
        "onnx_windows_per_s": onnx_rate(mean_batch),
        "scoring_batch_windows_single": mean_batch_single,
        "daemon_onnx_windows_per_s_single": single["windows"] / max(single["inference_s"], 1e-9),
        "onnx_windows_per_s_single": onnx_rate(mean_batch_single),
        "onnx_windows_per_s_batch1": onnx_rate(1),
        **peer_rates(mean_batch, values),
        "pinned": can_pin(),
    }


def table(r: dict[str, Any]) -> str:
    single_ratio = r["daemon_samples_per_s"] / r["transport_limit_msgs_per_s"]
    onnx_ratio = r["onnx_windows_per_s"] / r["daemon_onnx_windows_per_s"]
    single_onnx_ratio = r["onnx_windows_per_s_single"] / r["daemon_onnx_windows_per_s_single"]
    core = "core 1 (taskset)" if r["pinned"] else "any core (no taskset: not pinned)"
    one_ratio = r["daemon_one_core_samples_per_s"] / r["transport_limit_one_core_msgs_per_s"]
    rows = [
        ("bare paho subscriber, QoS 1", f"{r['transport_limit_msgs_per_s']:,.0f} msg/s", "1.00"),
        (
            "daemon, single-reading messages",
            f"{r['daemon_samples_per_s']:,.0f} samples/s",
            f"{single_ratio:.2f} of bare paho",
        ),
        (
            "bare paho subscriber, one core",
            f"{r['transport_limit_one_core_msgs_per_s']:,.0f} msg/s",
            "1.00",
        ),
        (
            "daemon, single-reading, one core",
            f"{r['daemon_one_core_samples_per_s']:,.0f} samples/s",
            f"{one_ratio:.2f} of bare paho on one core",
        ),
        (
            f"daemon, {BATCH_READINGS} readings per message, one core",
            f"{r['daemon_batched_samples_per_s']:,.0f} samples/s",
            "the model is the limit here (hop 1: a window per sample)",
        ),
        (
            f"onnxruntime alone, one core, batch {r['scoring_batch_windows']}",
            f"{r['onnx_windows_per_s']:,.0f} windows/s",
            f"{r['onnx_windows_per_s'] / r['daemon_batched_samples_per_s']:.2f}× the daemon's "
            "batched samples/s (hop 1: a window per sample)",
        ),
        (
            "  its runs inside the daemon, one core",
            f"{r['daemon_onnx_windows_per_s']:,.0f} windows/s",
            f"{onnx_ratio:.2f}× raw per window (wall time, core shared with paho)",
        ),
        (
            f"onnxruntime alone, batch {r['scoring_batch_windows_single']}",
            f"{r['onnx_windows_per_s_single']:,.0f} windows/s",
            "the daemon's mean batch with single-reading messages",
        ),
        (
            "  its runs inside the daemon",
            f"{r['daemon_onnx_windows_per_s_single']:,.0f} windows/s",
            f"{single_onnx_ratio:.2f}× raw per window",
        ),
        ("onnxruntime alone, batch 1", f"{r['onnx_windows_per_s_batch1']:,.0f} windows/s", ""),
        (
            f"publish → event, p50 / p99 at {r['latency_rate_per_s']:,.0f}/s",
            f"{r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f} ms",
            "half the sustained single-reading rate",
        ),
        (
            f"  at a quarter, {r['latency_quarter_rate_per_s']:,.0f}/s",
            f"{r['latency_quarter_p50_ms']:.1f} / {r['latency_quarter_p99_ms']:.1f} ms",
            "publishers, broker and listener share the cores with the daemon",
        ),
        (
            "  inside the daemon: arrival → event queued",
            f"{r['latency_own_under_25ms']:.0f} of {r['latency_own_events']:.0f} ≤ 25 ms",
            "start/end events of both runs (oteo_event_latency_seconds)",
        ),
        (
            "  bare paho subscriber: publish → reading",
            f"{r['latency_bare_p50_ms']:.1f} / {r['latency_bare_p99_ms']:.1f} ms",
            "the same publications, QoS 1, Receive Maximum 100",
        ),
        (
            "CPU per 1,000 samples",
            f"{r['cpu_s_per_1000_samples']:.3f} s / {r['cpu_s_per_1000_samples_batched']:.4f} s",
            "single-reading / batched messages",
        ),
        (
            "peak RSS",
            f"{r['rss_mb']:.0f} MB",
            f"single {r['rss_mb_single']:.0f}, batched {r['rss_mb_batched']:.0f}, "
            f"latency run {r['rss_mb_latency']:.0f}",
        ),
        ("start to READY", f"{r['ready_s']:.2f} s", "model loaded, warmed up, HTTP listening"),
        (
            "readings lost / messages dropped",
            f"{r['readings_lost']} / {r['messages_dropped']}",
            f"of {r['readings_sent']:,} readings sent",
        ),
        (
            "publishers (fill the backlog first)",
            f"{r['publisher_msgs_per_s']:,.0f} msg/s",
            "done before each drain starts: never the bottleneck",
        ),
    ]
    for key, label in (
        ("pyod_ae_windows_per_s", "PyOD AutoEncoder"),
        ("river_hst_samples_per_s", "River HalfSpaceTrees"),
    ):
        value = r[key]
        rows.append((label, value if isinstance(value, str) else f"{value:,.0f}/s", ""))
    width = max(len(a) for a, _, _ in rows)
    vwidth = max(len(b) for _, b, _ in rows)
    lines = [f"oteo throughput: demo model, {STREAMS} streams, hop 1, QoS 1; one core = {core}"]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Small backlogs (CI, under a minute).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def throughput(quick: bool, as_json: bool) -> None:
    """End-to-end speed: Mosquitto, publishers, the daemon with the demo model; one table."""

    def say(text: str) -> None:
        click.echo(f"· {text}", err=True)

    with tempfile.TemporaryDirectory(prefix="oteo-throughput-") as tmp:
        results = measure(Path(tmp), QUICK if quick else FULL, say)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(table(results))
