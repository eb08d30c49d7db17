"""The dashboard's "Scale out" row against a real Prometheus scraping two partitioned daemons.

Two real daemons (index 0 and 1 of 2, 4 partitions) on a real nats-server with the partition
mapping, readings of 8 streams published over a few seconds, a real Prometheus 2.42 scraping both
every second; then every query of the row runs through Prometheus' HTTP API and must parse and
return data, and the ownership panels must say what is true: each partition owned by exactly one
instance, two partitions each.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemon_harness import OteoProcess, wait_until
from fault_kit import T0, Fleet, reading, rows
from nats_kit import MqttPublisher, NatsServer
from test_dashboard import (
    SCALE_OUT_ROW,
    SCRAPE_S,
    Prometheus,
    dashboard,
    panel_queries,
    row_panels,
    samples,
    substitute,
)

from daemon.partition import partition_of

COUNT = 4
STREAMS = [f"line-{i}" for i in range(8)]
ROWS = 200
PUBLISH_S = 8.0


def test_scale_out_row_is_collapsed_and_covers_owners_throughput_and_checkpoints() -> None:
    doc = dashboard()
    panels = row_panels(doc, SCALE_OUT_ROW)
    row_exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "oteo_partition_owned",
        "oteo_partition_readings_total",
        "oteo_checkpoints_total",
        "oteo_partition_acks_held",
        "oteo_redelivered_duplicates_total",
        "oteo_redelivered_late_total",
    ):
        assert metric in row_exprs, f"the Scale out row does not show {metric}"
    assert "sum by (instance) (rate(oteo_readings_total" in row_exprs
    assert "sum by (instance) (rate(oteo_windows_scored_total" in row_exprs


def publish(pub: MqttPublisher) -> None:
    """ROWS readings of every stream, row by row, spread over PUBLISH_S seconds."""
    values = {s: rows(ROWS, seed=i) for i, s in enumerate(STREAMS)}
    start = time.monotonic()
    for row in range(ROWS):
        for stream in STREAMS:
            pub.send(f"sensors/{stream}/data", reading(T0 + row, values[stream][row], seq=row))
        while (wait := start + (row + 1) * PUBLISH_S / ROWS - time.monotonic()) > 0:
            pub.client.loop(min(wait, 0.01))
    pub.flush()


@pytest.mark.timeout(120)
def test_scale_out_queries_return_data_from_two_partitioned_daemons(
    tmp_path: Path, fleet: Fleet
) -> None:
    began = time.monotonic()
    doc = dashboard()
    nats = NatsServer(tmp_path / "nats", count=COUNT, ack_wait_s=3.0)
    nats.start()
    prometheus: Prometheus | None = None
    try:
        partitions = {"count": COUNT, "of": 2, "redelivery_wait_s": 3.0, "checkpoint_s": 1.0}
        daemons: list[OteoProcess] = [
            fleet(nats.url, mqtt={"protocol": "3.1.1"}, partitions={**partitions, "index": i})
            for i in range(2)
        ]
        prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{d.port}" for d in daemons])
        prom = prometheus

        def scraping() -> bool:
            scrapes = samples(prom.query('count_over_time(up{job="oteo"}[1m])', time.time()))
            return len(scrapes) == 2 and min(scrapes) >= 2

        assert wait_until(scraping, 15, 0.2), f"prometheus does not scrape both:\n{prom.log()}"
        pub = MqttPublisher(nats)
        publish(pub)
        pub.close()
        total = ROWS * len(STREAMS)

        def scraped_all() -> bool:
            got = samples(prom.query("sum(oteo_readings_total)", time.time()))
            return got == [float(total)]

        assert wait_until(scraped_all, 20, 0.2), "prometheus did not see every reading"
        at = time.time() + SCRAPE_S
        assert wait_until(lambda: time.time() > at + SCRAPE_S, 5, 0.1)

        failures = []
        for where, expr in panel_queries(doc):
            if where.split("'")[1] not in {p["title"] for p in row_panels(doc, SCALE_OUT_ROW)}:
                continue
            query = substitute(expr, doc)
            result = prom.query(query, at)
            if result.get("status") != "success":
                failures.append(f"{where}: {query}\n    error: {result.get('error')}")
            elif not result["data"]["result"]:
                failures.append(f"{where}: {query}\n    returned no data")
        assert not failures, "Scale out queries failing:\n" + "\n".join(failures)

        by_title = {p["title"]: p for p in row_panels(doc, SCALE_OUT_ROW)}
        owners_expr = substitute(by_title["Partition owners"]["targets"][0]["expr"], doc)
        owners = prom.query(owners_expr, at)["data"]["result"]
        instances = {f"127.0.0.1:{d.port}": i for i, d in enumerate(daemons)}
        owned = {int(r["metric"]["partition"]): instances[r["metric"]["instance"]] for r in owners}
        assert owned == {k: k % 2 for k in range(COUNT)}, owners
        sessions_expr = substitute(by_title["Sessions per partition"]["targets"][0]["expr"], doc)
        sessions = prom.query(sessions_expr, at)["data"]["result"]
        assert sorted(float(r["value"][1]) for r in sessions) == [1.0] * COUNT
        per_instance = substitute(by_title["Readings per instance"]["targets"][0]["expr"], doc)
        rates = {
            instances[r["metric"]["instance"]]: float(r["value"][1])
            for r in prom.query(per_instance.replace("rate(", "increase("), at)["data"]["result"]
        }
        # Each instance took only its own streams' readings (increase() extrapolates a little).
        for index in (0, 1):
            mine = sum(ROWS for s in STREAMS if partition_of(s, COUNT) % 2 == index)
            assert rates.get(index, 0.0) <= mine * 1.2, (index, rates, mine)
        assert sum(rates.values()) > 0
        assert time.monotonic() - began < 90, "keep this test under a minute and a half"
    finally:
        if prometheus is not None:
            prometheus.stop()
        nats.stop()
