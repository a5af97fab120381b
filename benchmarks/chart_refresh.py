"""How long one dashboard chart refresh takes for runs of 10k, 100k and 1M steps.

A refresh is what the page's chart fragment does about once a second: read rows from the run
store, smooth (debiased EMA) and downsample (min-max) them, and build the plotly figure.
Two cases:

* **cold**: a page that holds nothing yet reads *all* rows (first load, or a new tab);
* **live**: a page that holds the run so far reads only the rows logged since its last
  refresh (here 100, about a second of a fast run) and rebuilds the figure.

The figure's encoding for the chart component (:func:`app.stream_chart.figure_json`, what the
browser receives each refresh) is timed on its own, and its size is reported; beside it, the
size of plotly.py's own JSON (what ``st.plotly_chart`` sent before the component).

    .venv/bin/python benchmarks/chart_refresh.py [--sizes 10000 100000 1000000] [--repeat 5]

Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import plotly.io

from app.charts import training_figure
from app.data import fetch
from app.stream_chart import figure_json
from trainer.store import RunStore, SqliteStore

log = logging.getLogger("chart_refresh")

SIZES = (10_000, 100_000, 1_000_000)
CHUNK = 100_000            # rows per insert transaction while building a store
STEPS_PER_EPOCH = 1_000    # one validation row pair per epoch
EVENTS = 20                # knob changes drawn as markers
NEW_ROWS = 100             # rows logged between two live refreshes
SMOOTHING = 0.6


def build_store(run_dir: Path, steps: int) -> RunStore:
    """A run store with ``steps`` metric rows (a noisy decaying loss with NaN and spikes),
    per-epoch validation and a few intervention events."""
    store = SqliteStore(run_dir, create=True)
    rng = np.random.default_rng(0)
    now = time.time()
    for start in range(0, steps, CHUNK):
        s = np.arange(start, min(steps, start + CHUNK))
        loss = 2.0 / np.sqrt(1 + s) + rng.normal(0, 0.05, s.size)
        loss[rng.random(s.size) < 1e-4] = np.nan   # a few non-finite losses (stored NULL)
        rows = [(int(i), int(i) // STEPS_PER_EPOCH, now + i * 1e-3, float(v), 0.01, 0.9, 0.0)
                for i, v in zip(s, loss)]
        store.append_metrics(rows)
    epochs = range(STEPS_PER_EPOCH - 1, steps, STEPS_PER_EPOCH)
    store.append_validation([(e, e // STEPS_PER_EPOCH, now, name, value) for e in epochs
                             for name, value in (("loss", 0.5), ("accuracy", 0.9))])
    store.add_events([(int(k), now, "set", "lr", 0.01, 0.005, None, f"lr change {k}")
                      for k in np.linspace(0, steps - 1, EVENTS)])
    return store


def refresh(store: RunStore, caches: dict) -> object:
    """One chart refresh: incremental fetch into ``caches``, then the figure."""
    cache = fetch(store, caches)
    return training_figure(cache, cache["val"], cache["events"], smoothing=SMOOTHING)


def median_ms(action: Callable[[], object], repeat: int,
              setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(steps: int, repeat: int, root: Path) -> dict[str, float]:
    store = build_store(root / f"run-{steps}", steps)
    cold = median_ms(lambda: refresh(store, {}), repeat)
    caches: dict = {}
    refresh(store, caches)
    next_step = [steps]

    def log_new_rows() -> None:  # the trainer's part between two refreshes
        first = next_step[0]
        store.append_metrics([(i, i // STEPS_PER_EPOCH, time.time(), 0.1, 0.01, 0.9, 0.0)
                              for i in range(first, first + NEW_ROWS)])
        next_step[0] += NEW_ROWS

    live = median_ms(lambda: refresh(store, caches), repeat, setup=log_new_rows)
    figure = refresh(store, caches)
    encode = median_ms(lambda: figure_json(figure), repeat)
    sent, before = len(figure_json(figure)), len(plotly.io.to_json(figure, validate=False))
    store.close()
    return {"cold": cold, "live": live, "encode": encode, "kb": sent / 1e3,
            "kb_before": before / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines = ["| steps | cold refresh (all rows) ms | live refresh (+100 rows) ms | "
             "encoding ms | kB sent per refresh (st.plotly_chart's JSON) |",
             "|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.sizes:
            result = bench(steps, args.repeat, Path(tmp))
            lines.append(f"| {steps:,} | {result['cold']:.0f} | {result['live']:.0f} | "
                         f"{result['encode']:.0f} | {result['kb']:.0f} "
                         f"({result['kb_before']:.0f}) |")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
