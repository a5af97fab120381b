"""How long the dashboard's chart takes to open a long run, to refresh, and to zoom in.

Each case is what the page's chart fragment does: read from the run store, then build the
plotly figure (debiased EMA, min-max downsampling to ≤ 3000 points a trace):

* **first view**: a page that holds nothing yet opens the run. With levels of detail it reads
  the run's history as a few thousand buckets the store keeps (``RunStore.metrics_view``) and
  its last 10,000 steps raw (:func:`app.data.fetch`);
* **first view, all rows**: the same before levels of detail: every row read raw (run for
  sizes up to ``--all-rows-up-to``: at 10 M steps it needs gigabytes);
* **live refresh**: 100 rows are logged (about a second of a fast run), then the page reads
  only those and rebuilds the figure; beside it the same on a page that holds every row raw
  (before levels of detail);
* **zoom**: the user zooms into 1 % of the run, in the middle; the page reads that range in
  full detail (:func:`app.data.chart_view`) and rebuilds the figure.

The synthetic runs are written with SQL (a recursive CTE: a million rows in seconds), their
levels built once by the store's own statements, with per-epoch validation and a few events.
Cases run interleaved, round after round; the table holds medians, the rows a first view
reads and the kB a refresh sends the browser (the chart component's encoding).

    .venv/bin/python benchmarks/chart_refresh.py [--sizes 1000000 10000000] [--repeat 7]
        [--store postgresql://…]

``--store`` puts the runs in that PostgreSQL database instead of SQLite files. Prints a
Markdown table of medians, and the machine's load.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.charts import training_figure
from app.data import RAW_TAIL, chart_view, fetch
from app.stream_chart import figure_json
from trainer.store import RunStore
from trainer.store.address import open_store, run_address
from trainer.store.postgres import drop_run

log = logging.getLogger("chart_refresh")

SIZES = (1_000_000, 10_000_000)
STEPS_PER_EPOCH = 1_000    # one validation row pair per epoch
EVENTS = 20                # knob changes drawn as markers
NEW_ROWS = 100             # rows logged between two live refreshes
SMOOTHING = 0.6
ZOOM_SHARE = 0.01          # the zoom shows this share of the run
ALL_ROWS_UP_TO = 1_000_000
# The metrics of a run of {n} steps in SQL both dialects speak (no % operator: the PostgreSQL
# store's placeholders): a decaying loss with deterministic noise, a NULL (non-finite) loss
# every 9,973 steps, a spike every 99,991, and an LR that halves at 60 % of the run.
FILL = """
INSERT INTO metrics(step, epoch, wall, loss, lr, momentum, weight_decay, user_lr)
SELECT s, s / {epoch}, 1.7e9 + s * 1e-3,
       CASE WHEN s - (s / 9973) * 9973 = 9972 THEN NULL
            WHEN s - (s / 99991) * 99991 = 99990 THEN 50.0
            ELSE 2.0 / (1 + s / 1000.0) + 0.05 * (s * 7919 - ((s * 7919) / 1009) * 1009) / 1009.0
       END,
       CASE WHEN s < {cut} THEN 0.01 ELSE 0.005 END, 0.9, 0.0, 0.01
FROM (WITH RECURSIVE t(s) AS (SELECT CAST(0 AS BIGINT) UNION ALL SELECT s + 1 FROM t
                               WHERE s < {last})
      SELECT s FROM t) numbers
"""


def build_store(root: str, steps: int) -> RunStore:
    """A run of ``steps`` metric rows, its levels, per-epoch validation and a few events."""
    store = open_store(run_address(root, f"run-{steps}"), create=True)
    started = time.perf_counter()
    with store.transaction() as tx:
        tx.execute(FILL.format(epoch=STEPS_PER_EPOCH, cut=int(steps * 0.6), last=steps - 1))
        store._build_levels(tx)
    log.info("built a %s-step run in %.1f s", f"{steps:,}", time.perf_counter() - started)
    now = time.time()
    epochs = range(STEPS_PER_EPOCH - 1, steps, STEPS_PER_EPOCH)
    store.append_validation([(e, e // STEPS_PER_EPOCH, now, name, value) for e in epochs
                             for name, value in (("loss", 0.5), ("accuracy", 0.9))])
    store.add_events([(int(k), now, "set", "lr", 0.01, 0.005, None, f"lr change {k}")
                      for k in np.linspace(0, steps - 1, EVENTS)])
    return store


def figure(store: RunStore, cache: dict[str, Any], x_range=None) -> object:
    """The page's figure: the cached curves (in detail where zoomed), as app.main draws them."""
    series, focus = chart_view(store, cache, x_range)
    return training_figure(series, cache["val"], cache["events"], smoothing=SMOOTHING,
                           focus=focus)


def first_view(store: RunStore) -> object:
    return figure(store, fetch(store, {}))


def fetch_all_rows(store: RunStore, cache: dict[str, Any]) -> dict[str, Any]:
    """The page's fetch before levels of detail: every row raw, then only newer rows."""
    if not cache:
        cache.update(step=np.empty(0), wall=np.empty(0), loss=np.empty(0), lr=np.empty(0),
                     user_lr=np.empty(0), last_step=-1, val={}, events=[])
        for row in store.validation_since(0):
            cache["val"].setdefault(row["name"], ([], []))
            cache["val"][row["name"]][0].append(row["step"])
            cache["val"][row["name"]][1].append(row["value"])
        cache["events"] = store.events_since(0)
    rows = store.metrics_since(cache["last_step"],
                               columns=("step", "wall", "loss", "lr", "user_lr"))
    if rows["step"]:
        for name, values in rows.items():
            cache[name] = np.concatenate([cache[name], np.asarray(values, dtype=float)])
        cache["last_step"] = rows["step"][-1]
    return cache


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class Run:
    """One synthetic run and the state its cases keep between rounds."""

    def __init__(self, root: str, steps: int, all_rows: bool):
        self.steps = steps
        self.store = build_store(root, steps)
        self.next_step = steps
        self.caches: dict = {}
        fetch(self.store, self.caches)  # the page that stays open (live refresh)
        self.raw: dict | None = fetch_all_rows(self.store, {}) if all_rows else None
        self.zooms = 0
        self.times: dict[str, list[float]] = {}

    def log_rows(self) -> None:
        """The trainer's part between two refreshes."""
        first = self.next_step
        self.store.append_metrics([(i, i // STEPS_PER_EPOCH, time.time(), 0.1, 0.005, 0.9,
                                    0.0, 0.01) for i in range(first, first + NEW_ROWS)])
        self.next_step += NEW_ROWS

    def live(self) -> object:
        return figure(self.store, fetch(self.store, self.caches))

    def live_all_rows(self) -> object:
        cache = fetch_all_rows(self.store, self.raw)
        return training_figure(cache, cache["val"], cache["events"], smoothing=SMOOTHING)

    def zoom(self) -> object:
        cache = fetch(self.store, self.caches)
        width = self.steps * ZOOM_SHARE
        middle = self.steps / 2 + self.zooms * width  # a new range each time: read anew
        self.zooms += 1
        return figure(self.store, cache, (middle, middle + width))

    def first_all_rows(self) -> object:
        cache = fetch_all_rows(self.store, {})
        return training_figure(cache, cache["val"], cache["events"], smoothing=SMOOTHING)

    def round(self) -> None:
        cases = {"first": lambda: first_view(self.store), "live": self.live, "zoom": self.zoom}
        if self.raw is not None:
            cases.update(first_all=self.first_all_rows, live_all=self.live_all_rows)
        for name, action in cases.items():
            if name.startswith("live"):
                self.log_rows()
            self.times.setdefault(name, []).append(timed(action))

    def kb_sent(self) -> float:
        """What a refresh sends the browser (the chart component's encoding), in kB."""
        return len(figure_json(first_view(self.store))) / 1e3

    def rows_read(self) -> int:
        """Metric rows a first view reads: the history's buckets, then the raw tail."""
        first, last = self.store.metrics_extent()
        view = self.store.metrics_view(first, last - RAW_TAIL)
        ends = view["last_step"] if view["level"] else view["step"]
        return len(ends) + last - ends[-1]


def cell(times: dict[str, list[float]], name: str) -> str:
    return f"{median_ms(times[name]):.0f}" if name in times else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--all-rows-up-to", type=int, default=ALL_ROWS_UP_TO)
    parser.add_argument("--store", metavar="URL", help="a PostgreSQL database for the runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.store or str(Path(tmp) / "runs")
        runs = [Run(root, steps, steps <= args.all_rows_up_to) for steps in args.sizes]
        load = [os.getloadavg()[0]]
        for _ in range(args.repeat):  # interleaved: every case of every size, round by round
            for run in runs:
                run.round()
            load.append(os.getloadavg()[0])
        lines = [f"{'PostgreSQL' if args.store else 'SQLite'}, medians of {args.repeat} "
                 f"interleaved rounds (load average {min(load):.1f} to {max(load):.1f} on "
                 f"{os.cpu_count()} cores)", "",
                 "| logged steps | rows read | **first view** ms | first view, all rows ms | "
                 "live refresh (+100 rows) ms | live, all rows held ms | zoom to 1 % ms | "
                 "kB sent |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for run in runs:
            t = run.times
            lines.append(f"| {run.steps:,} | {run.rows_read():,} | **{cell(t, 'first')}** | "
                         f"{cell(t, 'first_all')} | {cell(t, 'live')} | {cell(t, 'live_all')} "
                         f"| {cell(t, 'zoom')} | {run.kb_sent():.0f} |")
            run.store.close()
            if args.store:
                drop_run(args.store, run.store.name)
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
