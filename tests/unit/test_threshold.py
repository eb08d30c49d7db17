"""The nonparametric dynamic threshold (daemon/threshold.py) against the paper's loop."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.threshold import MAX_RUNS, PRUNE, Z_VALUES, TrailingBaseline, nonparametric


def by_the_paper(values: np.ndarray) -> float:
    """Hundman et al. 2018, one z at a time: the reference the vectorised rule must equal."""
    mean, std = values.mean(), values.std()
    if std <= 0 or mean <= 0:
        return float(mean / (1 - PRUNE))
    best, pick = -np.inf, mean + Z_VALUES[-1] * std
    for z in Z_VALUES:
        eps = mean + z * std
        above = values >= eps
        count = int(above.sum())
        if count == 0 or count >= len(values) // 2:
            continue
        runs = int(np.count_nonzero(np.diff(np.r_[0, above.astype(np.int8)]) == 1))
        rest = values[~above]
        score = ((mean - rest.mean()) / mean + (std - rest.std()) / std) / (count + runs**2)
        if score >= best and runs <= MAX_RUNS:
            best, pick = score, eps
    below = values[values < pick]
    return float(max(pick, below.max() / (1 - PRUNE)) if len(below) else pick)


@pytest.mark.parametrize("seed", range(40))
def test_the_vectorised_rule_equals_the_papers_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(-3, 0.4, 2100)
    for _ in range(int(rng.integers(0, 4))):  # a few excursions of random height and length
        a = int(rng.integers(0, 2000))
        values[a : a + int(rng.integers(1, 80))] *= rng.uniform(1.5, 20)
    assert nonparametric(values) == pytest.approx(by_the_paper(values), rel=1e-9)


def test_an_excursion_sits_above_the_threshold_and_normal_scores_below() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(-3, 0.2, 2100)
    values[1500:1520] = 0.5  # ten times the normal level
    eps = nonparametric(values)
    normal = np.r_[values[:1500], values[1520:]]
    assert normal.max() / (1 - PRUNE) <= eps < 0.5


def test_a_constant_buffer_gets_the_pruning_floor_above_its_level() -> None:
    assert nonparametric(np.full(100, 0.2)) == pytest.approx(0.2 / (1 - PRUNE))


def test_a_buffer_recomputes_every_refresh_values() -> None:
    b = TrailingBaseline(size=50, refresh=10, seed=0.1, rule="nonparametric")
    first = b.level
    for _ in range(9):
        b.add(5.0)
    assert b.level == first  # nine new values: not yet
    b.add(5.0)
    assert b.level != first


def test_spread_lets_a_stream_above_its_seed_fill_the_seeds_slots_in_time_order() -> None:
    b = TrailingBaseline(size=12, refresh=3, seed=0.1, rule="median")
    for v in (1.0, 2.0, 3.0, 4.0):
        b.add(v)
    b.spread()
    assert b.snapshot()["values"] == [1.0, 2.0, 3.0, 4.0] * 3  # oldest first, no seed left
    assert b.level == pytest.approx(2.5)  # the stream's median, not the seed's 0.1
    b.add(9.0)  # the oldest goes first, as for any full buffer
    assert b.snapshot()["values"] == [2.0, 3.0, 4.0] + [1.0, 2.0, 3.0, 4.0] * 2 + [9.0]


def test_spread_keeps_the_seed_for_a_stream_at_or_under_it_or_with_too_few_values() -> None:
    under = TrailingBaseline(size=12, refresh=3, seed=5.0, rule="median")
    few = TrailingBaseline(size=12, refresh=3, seed=0.1, rule="median")
    for v in (1.0, 2.0, 3.0, 4.0):
        under.add(v)
    few.add(7.0)
    few.add(7.0)  # fewer than one refresh of its own
    for b, seed in ((under, 5.0), (few, 0.1)):
        before = b.snapshot()["values"]
        b.spread()
        assert b.snapshot()["values"] == before and before.count(seed) >= 8


def test_a_restored_buffer_remembers_how_much_is_its_own() -> None:
    b = TrailingBaseline(size=12, refresh=3, seed=0.1, rule="median")
    for v in (1.0, 2.0, 3.0, 4.0):
        b.add(v)
    again = TrailingBaseline(size=12, refresh=3, seed=0.1, rule="median")
    again.restore(b.snapshot())
    again.spread()
    assert again.snapshot()["values"] == [1.0, 2.0, 3.0, 4.0] * 3
    old = {k: v for k, v in b.snapshot().items() if k != "written"}  # a snapshot before spread
    legacy = TrailingBaseline(size=12, refresh=3, seed=0.1, rule="median")
    legacy.restore(old)
    legacy.spread()  # a stream judged before: its seed slots stay as they were
    assert legacy.snapshot()["values"] == old["values"]
