"""`oteo benchmark smap`: telemanom's layout, through the real trainer and runtime.

The tests on the real data skip, naming OTEO_DATASETS, when $OTEO_DATASETS/smap_msl (default
../shared/datasets beside the repository) is missing; the data are never copied into the
repository (the tarball is unpacked into a cache under the system's temporary folder). The
others build a tiny synthetic telemanom layout.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from training.bench import benchmark
from training.bench.smap import locate
from training.bench.smap_scoring import (
    EventCounts,
    pooled,
    read_labels,
    read_published,
    rescore_published,
    score_channel,
    spans,
)

DATASETS = Path(
    os.environ.get("OTEO_DATASETS", Path(__file__).parents[2].parent / "shared/datasets")
)
SMAP_MSL = DATASETS / "smap_msl"
TINY = ["--epochs", "2"]


def need_data() -> Path:
    if not SMAP_MSL.is_dir():
        pytest.skip(f"SMAP/MSL data not found at {SMAP_MSL} (set OTEO_DATASETS)")
    return SMAP_MSL


def test_telemanoms_published_predictions_rescore_to_its_published_numbers() -> None:
    found = locate(need_data())  # the tarball, unpacked into the cache
    assert found.published is not None
    chans = read_labels(found.folder / "labeled_anomalies.csv")
    assert len(chans) == 61 and sum(len(c.sequences) for c in chans) == 81
    published = read_published(found.published)
    # TP / FP / FN re-derived from their predicted sequences (tp_sequences + fp_sequences)
    # against the labels, by our scorer: the same as their own counts on every channel.
    ours = rescore_published(chans, published)
    assert ours == {p.chan_id: p.counts for p in published}
    table = pooled(ours, {c.chan_id: c.spacecraft for c in chans})
    # ../shared/datasets/README.md: P 0.870, R 0.827, F0.5 0.861; SMAP 0.839 / 0.922,
    # MSL 0.952 / 0.667.
    assert round(table["all"]["precision"], 3) == 0.870
    assert round(table["all"]["recall"], 3) == 0.827
    assert round(table["all"]["f05"], 3) == 0.861
    assert (round(table["SMAP"]["precision"], 3), round(table["SMAP"]["recall"], 3)) == (
        0.839,
        0.922,
    )
    assert (round(table["MSL"]["precision"], 3), round(table["MSL"]["recall"], 3)) == (
        0.952,
        0.667,
    )


def test_benchmark_on_two_real_channels_prints_json_and_writes_decisions(tmp_path: Path) -> None:
    need_data()
    out = tmp_path / "out"
    args = ["smap", str(DATASETS), "--json", "--out", str(out), "--only", "S-1,C-1", *TINY]
    result = CliRunner().invoke(benchmark, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("precision", "recall", "f05", "f1", "tp", "fp", "fn", "channels", "seconds"):
        assert key in summary
    assert summary["channels"] == 2 and summary["failed"] == {}
    assert summary["SMAP"]["channels"] == 1 and summary["MSL"]["channels"] == 1
    assert summary["published"]["all"]["channels"] == 2
    check_decisions(out, locate(DATASETS), summary)


def check_decisions(out: Path, data: object, summary: dict) -> None:  # type: ignore[type-arg]
    """decisions.csv per channel: one row per test row, and they give the JSON's counts."""
    folder = data.folder  # type: ignore[attr-defined]
    for chan in read_labels(folder / "labeled_anomalies.csv"):
        if chan.chan_id not in summary["per_channel"] or chan.chan_id in summary["failed"]:
            assert not (out / chan.chan_id).exists()
            continue
        lines = (out / chan.chan_id / "decisions.csv").read_text().splitlines()
        assert lines[0] == "row,score,alarm"
        rows = [line.split(",") for line in lines[1:]]
        assert len(rows) == len(np.load(folder / "test" / f"{chan.chan_id}.npy"))
        assert [int(r[0]) for r in rows] == list(range(len(rows)))
        alarm = np.array([int(r[2]) for r in rows], dtype=bool)
        counts = score_channel(spans(alarm), chan.sequences)
        assert counts == EventCounts(**summary["per_channel"][chan.chan_id])
        assert (out / chan.chan_id / "score.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def synthetic_layout(root: Path) -> Path:
    """Two channels in telemanom's layout: a telemetry column and two one-hot command columns,
    a level shift in each test array; a third channel too short to train on."""
    rng = np.random.default_rng(0)
    folder = root / "SMAP_MSL"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()

    def series(rows: int) -> np.ndarray:
        x = np.zeros((rows, 3))
        x[:, 0] = np.sin(np.arange(rows) / 6) + 0.05 * rng.standard_normal(rows)
        x[rows // 3 :: 50, 1] = 1.0  # a command now and then
        return x

    for chan in ("A-1", "P-1"):
        np.save(folder / "train" / f"{chan}.npy", series(700))
        test = series(900)
        test[500:560, 0] += 4.0
        np.save(folder / "test" / f"{chan}.npy", test)
    np.save(folder / "train" / "T-1.npy", series(10))
    np.save(folder / "test" / "T-1.npy", series(900))
    (folder / "labeled_anomalies.csv").write_text(
        "chan_id,spacecraft,anomaly_sequences,class,num_values\n"
        'A-1,MSL,"[[500, 559]]",[point],900\n'
        'P-1,SMAP,"[[500, 559], [100, 120]]","[point, point]",900\n'
        'T-1,SMAP,"[[500, 559]]",[point],900\n'
    )
    return folder


def test_a_tarball_is_unpacked_once_into_a_cache_and_failures_count_as_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "system-temp"
    cache.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(cache))
    layout = synthetic_layout(tmp_path / "src")
    data = tmp_path / "datasets" / "smap_msl"
    data.mkdir(parents=True)
    with tarfile.open(data / "smap_msl_dev.tar.gz", "w:gz") as archive:
        archive.add(layout, arcname="SMAP_MSL")
    out = tmp_path / "out"
    args = ["smap", str(tmp_path / "datasets"), "--json", "--out", str(out), *TINY]
    result = CliRunner().invoke(benchmark, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["channels"] == 3
    assert list(summary["failed"]) == ["T-1"] and "window" in summary["failed"]["T-1"]
    assert summary["per_channel"]["T-1"] == {"tp": 0, "fp": 0, "fn": 1}
    assert summary["tp"] + summary["fn"] == 4  # every labelled sequence is counted once
    assert "published" not in summary
    unpacked = [p for p in cache.iterdir() if p.name.startswith("oteo-smap-msl-")]
    assert len(unpacked) == 1 and not list(data.glob("SMAP_MSL"))
    check_decisions(out, locate(unpacked[0]), summary)
    # A second run reuses the cache.
    again = CliRunner().invoke(benchmark, [*args[:2], "--json", "--only", "A-1", *TINY])
    assert again.exit_code == 0, again.output
    # (torch may keep its own folder there too)
    assert [p.name for p in cache.iterdir() if "oteo" in p.name] == [unpacked[0].name]


def test_a_folder_without_the_layout_is_refused_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(benchmark, ["smap", str(tmp_path)])
    assert result.exit_code == 1
    assert "no SMAP_MSL folder" in result.output and len(result.output.splitlines()) == 1
