"""Property: hot reloads between models of other channels, windows, hops and sample periods,
interleaved at random with readings queued for whichever model was current when they were
parsed, never break the engine, and every reading is either taken into exactly one model's
windows or counted as dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scorer_stub import StubScorer, stub_for

from daemon.config import load_config
from daemon.engine import Engine
from daemon.intake import Layout, Work, new_layout
from daemon.metrics import Metrics
from daemon.reading import ParsedReading

RNG = np.random.default_rng(3)
NORMAL = RNG.normal(size=(500, 6)) * [1, 2, 3, 4, 5, 6] + [10, 20, 30, 40, 50, 60]

MODELS = [
    lambda: stub_for(NORMAL, window=8),
    lambda: stub_for(NORMAL[:, :3], ["c0", "c1", "c2"], window=12, hop=2),
    lambda: stub_for(NORMAL[:, 2:], ["c2", "c3", "c4", "c5"], window=4, hop=3),
    lambda: stub_for(NORMAL, window=8, period_s=2.0),
    lambda: stub_for(NORMAL, window=6, hop=1),  # same channels as the first: nothing dropped
]

# One step: ("read", stream, count) parses `count` readings with the current layout into the
# queue; ("drain", n) hands n queued messages to the engine; ("swap", i) reloads model i.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.sampled_from("abc"), st.integers(1, 30)),
        st.tuples(st.just("drain"), st.integers(1, 5)),
        st.tuples(st.just("swap"), st.integers(0, len(MODELS) - 1)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_random_swaps_never_break_the_engine_and_every_reading_is_accounted(
    tmp_path_factory, plan
) -> None:
    tmp: Path = tmp_path_factory.mktemp("swap")
    cfg = load_config(None, {"model.path": str(tmp / "m.onnx"), "state_dir": str(tmp)})
    metrics = Metrics()
    models: list[StubScorer] = [MODELS[0]()]
    engine = Engine(models[0], cfg, lambda out: None, metrics)
    layout: Layout = new_layout(models[0].manifest.channels)
    queued: list[Work] = []
    clock = {"a": 0.0, "b": 0.0, "c": 0.0}
    sent = 0
    for step in plan:
        if step[0] == "read":
            _, stream, count = step
            width = len(layout.channels)
            readings = []
            for _ in range(count):
                clock[stream] += 1.0
                values = NORMAL[int(clock[stream]) % len(NORMAL), :width].astype(np.float64)
                readings.append(ParsedReading(clock[stream], None, values))
            queued.append(Work(stream, readings, layout, size=count))
            sent += count
        elif step[0] == "drain":
            for work in queued[: step[1]]:
                engine.handle(work)
            del queued[: step[1]]
        else:
            models.append(MODELS[step[1]]())
            engine.use_model(models[-1])
            # The intake switches its parser after the engine (as the daemon does).
            layout = new_layout(models[-1].manifest.channels, layout.generation + 1)
    for work in queued:
        engine.handle(work)
    engine.score_pending()

    def count(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    taken = count("oteo_readings_total")
    dropped = {
        r: count("oteo_messages_total", result=r) for r in ("model_changed", "duplicate", "late")
    }
    assert taken + sum(dropped.values()) == sent, (taken, dropped, sent)
    # Each window went to exactly one model.
    assert sum(m.windows_scored for m in models) == count("oteo_windows_scored_total")
