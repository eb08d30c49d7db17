"""The Grafana dashboard, checked without Grafana.

Lint: a `datasource` variable (prometheus, default uid oteo-prometheus) used by every panel and
query, no other datasource uid, a unit on every panel, `$__rate_interval` in every rate() and
increase(), only metric names the daemon exports.

Live: a real Prometheus 2.42 on loopback (1 s scrapes, deploy's alert rules loaded) scrapes the
real daemon (`oteo run`, demo model) while simulated pumps publish to a real Mosquitto, one of
them with a fault; then every panel, variable and annotation query runs through Prometheus'
HTTP API: it must parse and return data. The alert rules must evaluate cleanly on the same
metrics, and OteoAnomalyActive must fire for the faulty stream only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import (
    OteoProcess,
    Publisher,
    daemon_config,
    free_port,
    reading,
    wait_until,
)

from daemon.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "oteo.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DEMO_MODEL = REPO / "models" / "demo.onnx"
DATASOURCE_UID = "oteo-prometheus"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Live run: 3 pumps, ROWS readings each published over about PUBLISH_S seconds of wall time,
# a level shift on pump-1's pressure sensor (as in test_daemon) so that events exist.
STREAMS = ("pump-0", "pump-1", "pump-2")
FAULTY = "pump-1"
ROWS, FAULT_START, FAULT_ROWS, FAULT_CHANNEL = 1000, 450, 300, 4
PUBLISH_S = 10.0
SCRAPE_S = 1
RATE_INTERVAL = "20s"  # stands in for $__rate_interval: 20 scrapes, and covers the fault
# Its panels need partitioned daemons on a NATS broker: test_dashboard_scale.py runs them.
SCALE_OUT_ROW = "Scale out"
Broker = Any  # conftest.Broker


# -- the dashboard as data -------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows and their nested panels flattened; rows themselves out)."""
    found = []
    for panel in doc["panels"]:
        nested = panel.get("panels", []) if panel.get("type") == "row" else [panel]
        found += [p for p in nested if p.get("type") != "row"]
    return found


def row_panels(doc: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels of the collapsed row `title`."""
    rows = [p for p in doc["panels"] if p.get("type") == "row" and p["title"] == title]
    assert len(rows) == 1 and rows[0].get("collapsed"), f"no collapsed row {title!r}"
    return list(rows[0]["panels"])


def panel_queries(
    doc: dict[str, Any], exclude: list[dict[str, Any]] | None = None
) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation (but the `exclude` panels')."""
    queries = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in query_panels(doc)
        if p not in (exclude or [])
        for t in p["targets"]
    ]
    queries += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in doc.get("annotations", {}).get("list", [])
        if "expr" in a
    ]
    return queries


def variables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def substitute(expr: str, doc: dict[str, Any], rate_interval: str = RATE_INTERVAL) -> str:
    """What Grafana would send: `$__rate_interval` a duration, every query variable `.*`."""
    out = expr.replace("$__rate_interval", rate_interval)
    for name, variable in variables(doc).items():
        if variable["type"] == "query":
            out = re.sub(rf"\$(\{{{name}\}}|{name}\b)", ".*", out)
    assert "$" not in out, f"unresolved variable in {out}"
    return out


def daemon_metric_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    registry = Metrics().registry
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def datasource_refs(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every `datasource` value anywhere in the dashboard, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from datasource_refs(value, f"{path}[{i}]")


RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase)\s*\(")


def range_selectors(expr: str) -> list[tuple[str, str]]:
    """(function, range) of each rate/irate/increase call: the [..] of its argument."""
    calls = []
    for match in RANGE_FUNCTIONS.finditer(expr):
        depth, i = 1, match.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        argument = expr[match.end() : i - 1]
        ranges = re.findall(r"\[([^\]]*)\]", argument)
        calls.append((match.group(1), ranges[-1] if ranges else ""))
    return calls


# -- lint ------------------------------------------------------------------------------------


def test_dashboard_has_a_prometheus_datasource_variable_defaulting_to_the_pinned_uid() -> None:
    doc = dashboard()
    ds = variables(doc).get("datasource")
    assert ds is not None, "no `datasource` variable"
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == DATASOURCE_UID
    assert doc["uid"] == "oteo", "the dashboard uid is pinned too (links, home dashboard)"


def test_every_panel_and_query_uses_the_datasource_variable_and_nothing_else() -> None:
    doc = dashboard()
    panels = query_panels(doc)
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE_REF, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, panel["title"]
    for name, variable in variables(doc).items():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE_REF, name
    # Nowhere a hard-coded datasource: every reference is the variable.
    refs = list(datasource_refs(doc))
    assert refs
    bad = [(where, ref) for where, ref in refs if ref != DATASOURCE_REF]
    assert not bad, bad
    text = DASHBOARD.read_text(encoding="utf-8")
    assert text.count(DATASOURCE_UID) == 1, "the pinned uid appears only as the default"


def test_every_panel_has_a_unit() -> None:
    for panel in query_panels(dashboard()):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{panel['title']}: no unit"


def test_every_rate_and_increase_uses_rate_interval() -> None:
    checked = 0
    for where, expr in panel_queries(dashboard()):
        for function, window in range_selectors(expr):
            assert window == "$__rate_interval", f"{where}: {function}(…[{window}]) in {expr}"
            checked += 1
    assert checked >= 20


def test_queries_use_only_metrics_the_daemon_exports() -> None:
    doc = dashboard()
    known = daemon_metric_names()
    used: set[str] = set()
    texts = [expr for _, expr in panel_queries(doc)]
    texts += [variable_query(v) for v in variables(doc).values() if v["type"] == "query"]
    for text in texts:
        names = set(re.findall(r"\boteo_[a-z0-9_]+", text))
        assert names <= known, f"unknown metrics {names - known} in {text}"
        used |= names
    # The brief's panels: streams, score vs threshold, events, throughput, latency, drops,
    # outbox, MQTT, model info, reloads.
    for metric in (
        "oteo_streams",
        "oteo_stream_score",
        "oteo_stream_threshold",
        "oteo_stream_anomalous",
        "oteo_events_total",
        "oteo_readings_total",
        "oteo_windows_scored_total",
        "oteo_messages_total",
        "oteo_event_latency_seconds_bucket",
        "oteo_inference_duration_seconds_bucket",
        "oteo_outbox_events",
        "oteo_outbox_bytes",
        "oteo_mqtt_connected",
        "oteo_model_info",
        "oteo_model_reloads_total",
    ):
        assert metric in used, f"no panel shows {metric}"


def test_score_panel_repeats_per_stream_with_its_threshold() -> None:
    doc = dashboard()
    assert variables(doc)["stream"]["includeAll"] and variables(doc)["stream"]["multi"]
    scores = [p for p in query_panels(doc) if p.get("repeat") == "stream"]
    assert len(scores) == 1
    exprs = " ".join(t["expr"] for t in scores[0]["targets"])
    assert 'oteo_stream_score{instance=~"$instance", stream=~"$stream"}' in exprs
    assert 'oteo_stream_threshold{instance=~"$instance", stream=~"$stream"}' in exprs


# -- live: real Prometheus scraping the real daemon ------------------------------------------


class Prometheus:
    """A real Prometheus on a free loopback port, its TSDB and config in a temporary dir."""

    def __init__(self, directory: Path, target: str | list[str]) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            pytest.fail("prometheus not found: install Debian's prometheus package")
        directory.mkdir()
        targets = [target] if isinstance(target, str) else target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        rules = directory / "rules.yml"
        shutil.copy(RULES, rules)
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  scrape_timeout: {SCRAPE_S}s\n"
            f"  evaluation_interval: {SCRAPE_S}s\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n  - job_name: oteo\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n",
            encoding="utf-8",
        )
        self.log_path = directory / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        if not wait_until(lambda: self.proc.poll() is not None or self.ready(), 15, 0.1):
            self.stop()
            pytest.fail(f"prometheus not ready in 15 s:\n{self.log()}")
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the JSON document, also for 4xx errors (which carry `error`)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as exc:
            return dict(json.load(exc))

    def query(self, expr: str, at: float) -> dict[str, Any]:
        return self.api("query", query=expr, time=f"{at:.3f}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def pump_series() -> dict[str, np.ndarray]:
    """ROWS readings per pump of the simulated build the demo model knows; pump-1 faulty."""
    from training.fault import inject
    from training.publisher import PublishPlan, stream_series
    from training.simulator import reference_scales

    plan = PublishPlan(url="mqtt://unused", streams=1, rate_hz=1.0, duration_s=ROWS, seed=0)
    series = {}
    for i, name in enumerate(STREAMS):
        values, _ = stream_series(dataclasses.replace(plan, seed=11 + i), 0)
        if name == FAULTY:
            rng = np.random.default_rng(5)
            values, _ = inject(
                values,
                "level_shift",
                FAULT_START,
                FAULT_ROWS,
                rng,
                channels=[FAULT_CHANNEL],
                scales=reference_scales(),
            )
        series[name] = values
    return series


def publish_paced(pub: Publisher, series: dict[str, np.ndarray], duration_s: float) -> None:
    """Row by row across the pumps, spread over `duration_s` of wall time (QoS 1)."""
    t0_data = time.time() - ROWS  # data time: one sample a second, ending about now
    start = time.monotonic()
    for row in range(ROWS):
        for name, values in series.items():
            pub.send(f"sensors/{name}/data", reading(t0_data + row, values[row], seq=row))
        due = start + (row + 1) * duration_s / ROWS
        while (wait := due - time.monotonic()) > 0:
            pub.client.loop(min(wait, 0.01))
    pub.flush()


def samples(result: dict[str, Any]) -> list[float]:
    data = result["data"]
    if data["resultType"] == "vector":
        return [float(item["value"][1]) for item in data["result"]]
    if data["resultType"] == "matrix":
        return [float(v) for item in data["result"] for _, v in item["values"]]
    return [float(data["result"][1])]


@pytest.mark.timeout(120)
def test_every_dashboard_query_returns_data_from_real_prometheus_scraping_the_daemon(
    tmp_path: Path, mosquitto: Broker
) -> None:
    began = time.monotonic()
    doc = dashboard()
    series = pump_series()
    directory = tmp_path / "oteo"
    directory.mkdir()
    # Recorded streams: their windows' hash bits feed the seen-before and label panels.
    config = daemon_config(directory, mosquitto.url, DEMO_MODEL, record={"streams": ["pump-*"]})
    daemon = OteoProcess(directory, config)
    prometheus: Prometheus | None = None
    pub: Publisher | None = None
    try:
        daemon.start()
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{daemon.port}")
        prom = prometheus

        def scraping() -> bool:
            # Prometheus applies new targets after up to 5 s; counters need a baseline scrape.
            scrapes = samples(prom.query('count_over_time(up{job="oteo"}[1m])', time.time()))
            return bool(scrapes) and scrapes[0] >= 2

        assert wait_until(scraping, 15, 0.2), f"prometheus does not scrape oteo:\n{prom.log()}"
        pub = Publisher(mosquitto.host, mosquitto.port)
        publish_paced(pub, series, PUBLISH_S)
        total = ROWS * len(STREAMS)
        daemon.wait_metric(lambda m: m("oteo_readings_total") == total, 20, "every reading")
        assert daemon.metrics()("oteo_events_total", kind="start") >= 1, "the fault raised none"
        # The operator labels the fault's episode: the label panels and annotation have data.
        _, body = daemon.get(f"/v1/events?stream={FAULTY}&limit=1")
        event_id = json.loads(body)[0]["event_id"]
        label = {"event_id": event_id, "label": "confirmed", "cause": "pressure sensor"}
        assert daemon.post_json("/v1/ops/label", label)[0] == 200

        def scraped_all() -> bool:
            result = prom.query("oteo_readings_total", time.time())
            return samples(result) == [float(total)]

        assert wait_until(scraped_all, 10, 0.2), "prometheus did not scrape the last readings"
        at = time.time()

        def scraped_twice_more() -> bool:
            # A couple more scrapes (and rule evaluations, on the same interval) after the last
            # reading: the latest scrape is at least one interval after it.
            last = samples(prom.query('timestamp(up{job="oteo"})', time.time()))
            return bool(last) and last[0] >= at + SCRAPE_S

        assert wait_until(scraped_twice_more, 10, 0.2), f"no more scrapes:\n{prom.log()}"

        failures = []
        for where, expr in panel_queries(doc, exclude=row_panels(doc, SCALE_OUT_ROW)):
            query = substitute(expr, doc)
            result = prometheus.query(query, at)
            if result.get("status") != "success":
                failures.append(f"{where}: {query}\n    error: {result.get('error')}")
            elif not result["data"]["result"]:
                failures.append(f"{where}: {query}\n    returned no data")
            elif not any(math.isfinite(v) for v in samples(result)):
                failures.append(f"{where}: {query}\n    only NaN/Inf: {samples(result)}")
        for name, variable in variables(doc).items():
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(variable))
            assert match, f"variable {name}: expected label_values(selector, label)"
            selector, label = substitute(match.group(1), doc), match.group(2)
            result = prometheus.api(f"label/{label}/values", **{"match[]": selector})
            if result.get("status") != "success" or not result["data"]:
                failures.append(f"variable {name}: {selector} -> {result}")
            elif name == "stream":
                assert set(result["data"]) == set(STREAMS), result["data"]
        assert not failures, "dashboard queries failing:\n" + "\n".join(failures)

        # The alert rules evaluated on the same real metrics: no rule errors, and the anomaly
        # alert fired for the faulty pump only.
        groups = prometheus.api("rules")["data"]["groups"]
        evaluated = [rule for group in groups for rule in group["rules"]]
        assert len(evaluated) >= 11
        unhealthy = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
        assert not unhealthy, unhealthy
        fired = prometheus.query(
            'max_over_time(ALERTS{alertname="OteoAnomalyActive", alertstate="firing"}[1m])',
            time.time(),
        )
        streams = {item["metric"]["stream"] for item in fired["data"]["result"]}
        assert streams == {FAULTY}, fired
        assert time.monotonic() - began < 60, "keep this test under a minute"
    finally:
        if pub is not None:
            pub.close(flush=False)
        if prometheus is not None:
            prometheus.stop()
        daemon.kill()
