"""`oteo benchmark nab` on three small NAB files, through the real trainer and runtime.

Needs the NAB folder: nab/ in $OTEO_DATASETS (default: shared/datasets beside the repository);
the data are never copied into the repository: the test links three files into a temporary
NAB layout. Without the data it skips, naming OTEO_DATASETS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from training.bench import benchmark
from training.bench.nab import (
    DetectorConfig,
    anomaly_score,
    read_corpus,
    report_rises,
    run_file,
)

DATASETS = Path(
    os.environ.get("OTEO_DATASETS", Path(__file__).parents[2].parent / "shared/datasets")
)
NAB = DATASETS / "nab"
FILES = (
    "realAdExchange/exchange-2_cpc_results.csv",
    "realTraffic/speed_7578.csv",
    "realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv",
)
needs_nab = pytest.mark.skipif(
    not (NAB / "labels" / "combined_windows.json").exists(),
    reason=f"NAB data not found at {NAB} (set OTEO_DATASETS to the datasets folder)",
)


@pytest.fixture(scope="module")
def small_nab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nab")
    for name in (
        "labels/combined_windows.json",
        "config/profiles.json",
        *(f"data/{f}" for f in FILES),
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to((NAB / name).resolve())
    return root


@needs_nab
def test_command_prints_scores_for_three_profiles_and_writes_anomaly_scores_and_plots(
    small_nab: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(benchmark, ["nab", str(small_nab), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 3 and summary["failed"] == {} and summary["seconds"] > 0
    assert summary["fixed"]["threshold"] == 0.5
    for profile in ("standard", "low_fp", "low_fn"):
        # The optimum includes "no detection" (0) and cannot beat the perfect detector (100).
        assert 0.0 <= summary[profile] <= 100.0
        assert summary["fixed"][profile] <= summary[profile] + 1e-9
    assert "[3/3]" in result.stderr
    for f in read_corpus(small_nab):
        lines = (out / f.labelled.name).read_text().splitlines()
        assert lines[0] == "timestamp,anomaly_score" and len(lines) == f.labelled.rows + 1
        anomaly = np.array([float(line.split(",")[1]) for line in lines[1:]])
        assert ((anomaly >= 0) & (anomaly < 1)).all()
        assert not anomaly[: f.labelled.probation].any()
        assert anomaly.any()  # the detector's score is non-zero after the probation
        assert [line.split(",")[0] for line in lines[1:]] == f.stamps
        plot = (out / f.labelled.name).with_suffix(".png")
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_nab
def test_later_rows_never_change_earlier_anomaly_scores(small_nab: Path, tmp_path: Path) -> None:
    f = next(f for f in read_corpus(small_nab) if f.labelled.name.endswith("speed_7578.csv"))
    cut = 700
    before = run_file(f, DetectorConfig(), tmp_path).anomaly
    f.values = f.values.copy()
    f.values[cut:] = f.values[cut:][::-1] * 3.0  # a different future, same length
    after = run_file(f, DetectorConfig(), tmp_path).anomaly
    np.testing.assert_array_equal(before[:cut], after[:cut])
    assert not np.array_equal(before[cut:], after[cut:])


def test_anomaly_score_is_half_at_the_threshold_and_rises_are_reported_causally() -> None:
    rng = np.random.default_rng(1)
    threshold = rng.uniform(1.0, 3.0, size=3000)
    detection = rng.lognormal(size=3000)
    detection[:5] = np.nan  # no window yet
    score = anomaly_score(detection, threshold)
    assert not score[:5].any() and ((score >= 0) & (score < 1)).all()
    at = anomaly_score(np.array([2.0, 1.0, 4.0]), np.array([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(at, [0.5, 1 / 3, 2 / 3])
    full = report_rises(score, 288)
    for k in (1, 250, 2999):
        np.testing.assert_array_equal(report_rises(score[:k], 288), full[:k])
    # A row is kept only where it beats the previous 288 rows, so every 288 rows hold few.
    kept = np.flatnonzero(full)
    assert 0 < len(kept) < 3000 / 288 * 12
    assert all(full[i] > score[max(0, i - 288) : i].max(initial=-1) for i in kept)


def test_preset_default_trains_what_oteo_train_does() -> None:
    from training.bench.nab import train_options
    from training.config import options_for

    product = train_options(DetectorConfig(preset="default", seed=2), "f")
    assert product == options_for("default", 1, seed=2, progress=False, name="f")
    own = train_options(DetectorConfig(), "f")
    assert (own.model.hidden, own.model.code_size, own.cross_fit) == (32, 4, False)
