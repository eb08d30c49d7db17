"""The pieces of `oteo benchmark scale`: a 3-node NATS cluster, partitioned oteo instances,
publishers and an output collector, all real processes on loopback.

`python -m training.bench.fleet collect` is the collector process: an MQTT 3.1.1 subscriber that
records every window score and event the instances publish, until SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from training.bench.throughput import BASE_TS, DEMO_MODEL, free_port, loadgen, scrape

PARTITIONS = 16
# nats-server's MQTT ack_wait here: 5 s caused thousands of needless redeliveries under load
# (a drained backlog is delivered faster than it is acknowledged).
ACK_WAIT_S = 10.0
# The instances' redelivery_wait_s: ack_wait plus a margin. The broker goes on delivering to a
# killed instance for seconds; with no margin, a clean-clone CI run lost 3,502 readings whose
# redeliveries came after newer ones (docs/scale-out.md).
REDELIVERY_WAIT_S = ACK_WAIT_S + 10.0


def nats_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/sbin")
    if found is None:
        raise click.ClickException("nats-server not found: install Debian's nats-server package")
    return found


@dataclass
class Node:
    """One nats-server: ports, files, process."""

    name: str
    directory: Path
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def write_config(self, routes: list[int], partitions: int, ack_wait_s: float) -> Path:
        from daemon.partition import nats_mapping

        route_urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
        path = self.directory / f"{self.name}.conf"
        path.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.directory / self.name}" }}\n'
            f"cluster {{ name: oteo, listen: 127.0.0.1:{self.cluster_port}, "
            f"routes: [{route_urls}] }}\n"
            f'mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, ack_wait: "{ack_wait_s:g}s" }}\n'
            f"mappings = {{ {nats_mapping(partitions)} }}\n"
        )
        return path

    def start(self) -> None:
        log = open(self.directory / f"{self.name}.log", "ab")  # noqa: SIM115 - the child has it
        conf = self.directory / f"{self.name}.conf"
        self.proc = subprocess.Popen(
            [nats_binary(), "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()

    def jsz(self, query: str = "") -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/jsz{query}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                doc: dict[str, Any] = json.load(response)
                return doc
        except (OSError, ValueError):
            return {}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def subscribed_partitions(jsz: dict[str, Any]) -> set[int]:
    """Partitions k with a QoS 1 MQTT subscription on `part/<k>/...` in a NATS node's /jsz
    document (accounts, streams, consumers, config): a consumer of the stream `$MQTT_msgs`
    filtered on it, with a leader. A partition short of either loses what is published
    meanwhile: the consumer's deliver policy is "new", it starts at the stream's next message
    when its leader creates it."""
    found: set[int] = set()
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream.get("name") != "$MQTT_msgs":
                continue
            for consumer in stream.get("consumer_detail") or []:
                subject = str(consumer.get("config", {}).get("filter_subject", ""))
                parts = subject.split(".")
                led = (consumer.get("cluster") or {"leader": "single node"}).get("leader")
                if subject.startswith("$MQTT.msgs.part.") and parts[3].isdigit() and led:
                    found.add(int(parts[3]))
    return found


class NatsCluster:
    """Three nats-server nodes with JetStream clustered, the MQTT listener and the mapping."""

    def __init__(self, directory: Path, partitions: int = PARTITIONS) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(f"n{i}", directory) for i in range(3)]
        for node in self.nodes:
            node.write_config([n.cluster_port for n in self.nodes], partitions, ACK_WAIT_S)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_ready()

    def running(self) -> list[Node]:
        """The nodes whose process is alive (one may have been killed)."""
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Every running node agrees on a JetStream meta leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = {n.jsz().get("meta_cluster", {}).get("leader") for n in self.running()}
            if len(leaders) == 1 and None not in leaders:
                return
            time.sleep(0.1)
        raise click.ClickException("the NATS cluster has no JetStream leader after 30 s")

    def wait_streams_led(self, timeout_s: float = 30.0) -> None:
        """Every JetStream stream (the MQTT sessions', messages', retained messages') has a
        leader, as the first running node sees them: until then QoS 1 stores time out, and the
        broker closes the connection that asked (after 4 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = self.running()
            doc = running[0].jsz("?accounts=true&streams=true") if running else {}
            streams = [
                stream
                for account in doc.get("account_details") or []
                for stream in account.get("stream_detail") or []
            ]
            if streams and all((s.get("cluster") or {}).get("leader") for s in streams):
                return
            time.sleep(0.2)
        raise click.ClickException(f"JetStream streams without a leader after {timeout_s:g} s")

    def subscribed_partitions(self) -> set[int]:
        """Partitions whose MQTT session has subscribed, as the first running node sees them."""
        running = self.running()
        query = "?accounts=true&streams=true&consumers=true&config=true"
        return subscribed_partitions(running[0].jsz(query)) if running else set()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Instance:
    """`oteo run` with `[partitions]` (or without, `partitions=0`, for the Mosquitto baseline)."""

    directory: Path
    index: int
    of: int
    mqtt_port: int
    partitions: int = PARTITIONS
    publish_scores: bool = False
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        shared = self.directory.parent / "checkpoints"  # every instance's, as on one box
        text = (
            f'instance = "bench-{self.index}"\n'
            f'state_dir = "{self.directory / "state"}"\n'
            f'[model]\npath = "{DEMO_MODEL}"\n'
            f'[mqtt]\nurl = "mqtt://127.0.0.1:{self.mqtt_port}"\n'
            f'protocol = "{"3.1.1" if self.partitions else "5"}"\n'
            "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n"
            f'[http]\nbind = "127.0.0.1"\nport = {self.http_port}\n'
            f"[topics]\npublish_scores = {'true' if self.publish_scores else 'false'}\n"
            # Every stream its own series: which instance scored it is read from them.
            "[metrics]\nmax_stream_labels = 1000\n"
            # Every stream is new to the instance and faults recur from its first minutes: no
            # warm-up (300 s of data judged at 6x the thresholds would hide them).
            "[alarm]\nwarmup_s = 0\n"
        )
        if self.partitions:
            text += (
                f"[partitions]\ncount = {self.partitions}\nindex = {self.index}\nof = {self.of}\n"
                f'checkpoint_dir = "{shared}"\nredelivery_wait_s = {REDELIVERY_WAIT_S:g}\n'
            )
        path = self.directory / "oteo.toml"
        path.write_text(text)
        return path

    def start(self, wait: bool = True) -> None:
        for attempt in range(3):
            script = Path(sys.executable).with_name("oteo")
            cmd = [str(script), "run", "--config", str(self.write_config())]
            log = open(self.directory / "oteo.log", "ab")  # noqa: SIM115 - the child has it
            began = log.tell()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            log.close()
            if not wait:
                return
            try:
                self.wait_http()
                return
            except click.ClickException:
                # free_port() only found a port free a moment ago: an outgoing connection on
                # loopback may have taken it since (a run here lost one that way). Another one.
                text = (self.directory / "oteo.log").read_bytes()[began:]
                if attempt == 2 or b"cannot listen on" not in text:
                    raise
                self.http_port = free_port()

    def wait_http(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise click.ClickException(f"oteo instance {self.index} exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz") as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise click.ClickException(f"oteo instance {self.index} did not serve HTTP in 30 s")

    def log(self) -> str:
        path = self.directory / "oteo.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def metrics(self) -> dict[str, float]:
        try:
            return scrape(self.http_port)
        except OSError:
            return {}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """kill -9: no checkpoint, no acknowledgement, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def per_stream(metrics: dict[str, float], name: str) -> dict[str, float]:
    """{stream: value} of a per-stream series in one scrape (zeros left out)."""
    out = {}
    prefix = f'{name}{{stream="'
    for key, value in metrics.items():
        if key.startswith(prefix) and value:
            out[key[len(prefix) : key.index('"', len(prefix))]] = value
    return out


def publish(
    ports: list[int],
    series: Path,
    streams: int,
    per_stream_msgs: int,
    start: int,
    *,
    v311: bool = True,
    rate: float = 0.0,
    fault_every: int = 10,
) -> list[subprocess.Popen[str]]:
    """Start one publisher process per port, the streams split between them (single readings,
    QoS 1); returns the processes (see `finish`)."""
    share = streams // len(ports)
    procs = []
    for p, port in enumerate(ports):
        cmd = loadgen(
            "publish", f"--port={port}", f"--series={series}", f"--first-stream={p * share}",
            f"--streams={share}", f"--per-stream={per_stream_msgs}", "--batch=1",
            f"--start={start}", f"--base-ts={BASE_TS}", f"--rate={rate / len(ports)}",
            f"--fault-every={fault_every}",
        )  # fmt: skip
        if v311:
            cmd.append("--v311")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen[str]], strict: bool = True) -> dict[str, float]:
    """Wait for the publishers; what they sent, what the broker acknowledged and how fast.
    `strict`: every publisher must succeed and every publication be acknowledged; otherwise a
    publisher that failed (it could not connect) is counted in `failed` and sent nothing."""
    docs, failed = [], 0
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            if strict:
                raise click.ClickException("a publisher process failed")
            failed += 1
            continue
        docs.append(json.loads(out.strip().splitlines()[-1]))
    sent = sum(d["sent"] for d in docs)
    acked = sum(d["acked"] for d in docs)
    if strict and acked != sent:
        raise click.ClickException(f"the broker acknowledged {acked} of {sent} publications")
    elapsed = max((d["t_acked"] for d in docs), default=0.0) - min(
        (d["t0"] for d in docs), default=0.0
    )
    reconnects = sum(d.get("reconnects", 0) for d in docs)
    rate = sent / max(elapsed, 1e-9)
    return {
        "sent": sent, "acked": acked, "msgs_per_s": rate, "reconnects": reconnects,
        "failed": failed,
    }  # fmt: skip


class Collector:
    """The collector process: every window score and event published, with its time."""

    def __init__(self, directory: Path, port: int) -> None:
        self.out = directory / "collected.json"
        cmd = [sys.executable, "-m", "training.bench.fleet", "collect", f"--port={port}"]
        self.proc = subprocess.Popen([*cmd, f"--out={self.out}"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if "ready" not in self.proc.stdout.readline():
            raise click.ClickException("the collector did not subscribe")

    def finish(self) -> list[list[Any]]:
        """Stop it; rows [kind ("score" or the event kind), stream, seq]."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=60)
        rows: list[list[Any]] = json.loads(self.out.read_text())
        return rows


@click.group()
def main() -> None:
    """Helper processes of `oteo benchmark scale`."""


@main.command()
@click.option("--port", type=int, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def collect(port: int, out: Path) -> None:
    """Record [kind, stream, seq] of every score and event on oteo/+/score|event until SIGTERM."""
    from training.bench.loadgen import _client, _connect, subscribe_ready

    rows: list[list[Any]] = []
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def on_message(c: Any, u: object, msg: Any) -> None:
        doc = json.loads(msg.payload)
        ts = datetime.fromisoformat(doc["ts"].replace("Z", "+00:00")).timestamp()
        kind = "score" if msg.topic.endswith("/score") else doc["kind"]
        rows.append([kind, doc["stream"], round(ts) - BASE_TS])

    client = _client(f"bench-collect-{os.getpid()}", True, v311=True)
    client.on_message = on_message
    _connect(client, port, clean=True)
    subscribe_ready(client, [("oteo/+/score", 1), ("oteo/+/event", 1)])
    while not stop:
        client.loop(0.05)
    client.disconnect()
    out.write_text(json.dumps(rows))
    print(json.dumps({"received": len(rows)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
