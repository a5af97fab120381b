"""What the levels of detail cost the flusher: a batch's write, with and without them.

The flusher writes the rows the training thread buffered in one ``append_metric_columns``
call (one transaction; the batch as columns, as the flusher holds it). Keeping the levels adds
one statement per level to that transaction (``RunStore._refresh_levels``: SQLite runs them
with the GIL released). This times the same call with the levels kept and with their upkeep
switched off (the write as it was before levels existed), on a run that already holds 1 M
steps, in interleaved pairs (ABBA), and prints medians per batch and per row: wall time, and
the calling thread's CPU time (SQLite runs in it).

    .venv/bin/python benchmarks/append_cost.py [--rounds 41] [--batches 1000 230]
        [--store postgresql://…]

Batches: 1,000 rows, and 575 (a flush every 0.25 s at 2,300 steps/s, the digits MLP's
speed).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from trainer.store import RunStore
from trainer.store.address import open_store, run_address
from trainer.store.postgres import drop_run

log = logging.getLogger("append_cost")

HISTORY = 1_000_000        # steps the run holds before the timed writes
FILL = ("INSERT INTO metrics(step, epoch, wall, loss, lr, momentum, weight_decay, user_lr) "
        "SELECT s, s / 1000, 1.7e9 + s * 1e-3, 1.0 / (1 + s), 0.01, 0.9, 0.0, 0.01 FROM ("
        "WITH RECURSIVE t(s) AS (SELECT 0 UNION ALL SELECT s + 1 FROM t WHERE s < {last}) "
        "SELECT s FROM t) numbers")


def no_levels():
    """The write without the levels' upkeep (the cost before levels existed)."""
    return mock.patch.object(RunStore, "_refresh_levels", staticmethod(lambda tx, a, b: None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 575])
    parser.add_argument("--store", metavar="URL", help="a PostgreSQL database for the run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.store or str(Path(tmp) / "runs")
        store = open_store(run_address(root, "append-cost"), create=True)
        try:
            lines = measure(store, args.rounds, args.batches)
        finally:
            store.close()
            if args.store:
                drop_run(args.store, "append-cost")
    log.info("\n".join([f"{'PostgreSQL' if args.store else 'SQLite'}, medians of "
                        f"{args.rounds} interleaved pairs", "", *lines]))


def measure(store: RunStore, rounds: int, batches: list[int]) -> list[str]:
    with store.transaction() as tx:
        tx.execute(FILL.format(last=HISTORY - 1))
        store._build_levels(tx)
    step = HISTORY
    load = [os.getloadavg()[0]]
    times: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for size in batches:
            for levels in ((True, False) if r % 2 else (False, True)):  # ABBA
                columns = list(zip(*[(s, s // 1000, 1.7e9 + s * 1e-3, 1.0 / (1 + s), 0.01,
                                      0.9, 0.0, 0.01) for s in range(step, step + size)]))
                step += size
                with contextlib.nullcontext() if levels else no_levels():
                    wall, cpu = time.perf_counter(), time.thread_time()
                    store.append_metric_columns(columns)
                    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                times.setdefault((size, levels), []).append((wall, cpu))
        load.append(os.getloadavg()[0])
    lines = [f"load average {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores", "",
             "| rows a batch | without levels: ms (CPU ms) | with levels: ms (CPU ms) | "
             "added per 1,000 rows: ms (CPU ms) |", "|---:|---:|---:|---:|"]
    for size in batches:
        (off_wall, off_cpu), (on_wall, on_cpu) = (
            (statistics.median(t[0] for t in times[size, levels]) * 1e3,
             statistics.median(t[1] for t in times[size, levels]) * 1e3)
            for levels in (False, True))
        per = 1000 / size
        lines.append(f"| {size:,} | {off_wall:.2f} ({off_cpu:.2f}) | {on_wall:.2f} "
                     f"({on_cpu:.2f}) | {(on_wall - off_wall) * per:+.2f} "
                     f"({(on_cpu - off_cpu) * per:+.2f}) |")
    return lines


if __name__ == "__main__":
    main()
