"""How much does babysitting cost? Two figures for the README.

1. Throughput overhead: the digits MLP trained by a bare loop and by the same loop with
   ``Babysitter.step(loss)`` every step, interleaved (bare, babysat, bare, …) for several
   rounds; we report the median throughput ratio. Goal: ≤ 2 % overhead.
2. Command latency: a real ``panda train`` subprocess, commands committed to its store the way
   ``panda set`` commits them, and the time from commit to application at a step boundary
   (the intervention event's wall time) and to the trainer's confirmation in the store.

    .venv/bin/python benchmarks/overhead.py [--rounds 15 --steps 2000 --commands 40]

With ``--store postgresql://…`` the babysat loop and the trainer keep the run in that
PostgreSQL database instead of a SQLite file (the bare loop is the same either way).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer import Babysitter
from trainer.store import StoreError
from trainer.store.address import store_for
from trainer.tasks import make_task

BATCH_SIZE = 32
ARRIVAL_JITTER_S = 0.2  # random wait before each command of the latency test


def _loop(task, model, optimizer, steps: int, babysitter: Babysitter | None, *,
          seed: int = 0, ready=None) -> float:
    """Train ``steps`` steps; return steps per second. ``ready()`` runs just before the clock
    starts (DDP ranks use a barrier there)."""
    epoch, done = 0, 0
    if ready is not None:
        ready()
    start = time.perf_counter()
    while done < steps:
        for x, y in task.batches(BATCH_SIZE, seed=seed, epoch=epoch):
            loss = task.loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if babysitter is not None:
                babysitter.step(loss)
            done += 1
            if done == steps:
                break
        epoch += 1
    return steps / (time.perf_counter() - start)


def _fresh(task):
    model = make_task("digits", seed=0).model  # same initial weights every time
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def throughput(rounds: int, steps: int, store: str | None = None) -> dict[str, float]:
    """Paired rounds, alternating which loop goes first (ABBA), so a machine that speeds up or
    slows down during the run does not favour either loop."""
    task = make_task("digits", seed=0)
    bare, babysat = [], []

    def run_bare() -> None:
        model, opt = _fresh(task)
        bare.append(_loop(task, model, opt, steps, None))

    def run_babysat(i: int) -> None:
        model, opt = _fresh(task)
        with Babysitter(opt, Path(tmp) / f"r{i}-{time.time_ns()}", model=model,
                        store=store) as bs:
            babysat.append(_loop(task, model, opt, steps, bs))

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            if i % 2 == 0:
                run_bare()
                run_babysat(i)
            else:
                run_babysat(i)
                run_bare()
    ratios = sorted(b / a for a, b in zip(bare, babysat))
    quartiles = statistics.quantiles(ratios, n=4)
    return {"bare_steps_per_s": statistics.median(bare),
            "babysat_steps_per_s": statistics.median(babysat),
            "ratio": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2]}


def command_latency(commands: int, store_url: str | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / f"latency-{time.time_ns()}"
        where = [] if store_url is None else ["--store", store_url]
        proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", "--task", "digits",
                                 "--run-dir", str(run_dir), "--epochs", "100000",
                                 "--step-delay", "0.002", *where],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            store = None
            while store is None:
                try:
                    store = store_for(run_dir, store_url)
                except StoreError:
                    time.sleep(0.05)
            while store.summary()["step"] < 10:
                time.sleep(0.05)
            applied, confirmed = [], []
            arrivals = random.Random(0)
            for i in range(commands):
                # A person's commands arrive at any moment, not in step with the trainer's
                # polling (sending each right after the last one's verdict would be).
                time.sleep(arrivals.uniform(0, ARRIVAL_JITTER_S))
                lr = 0.01 if i % 2 else 0.005
                command_id = store.submit_command("set", {"lr": lr}, source="bench")
                while store.command(command_id).status == "pending":
                    time.sleep(0.005)
                confirmed.append(time.time() - store.command(command_id).created)
                event = next(e for e in store.events_since(0) if e["command_id"] == command_id)
                applied.append(event["wall"] - store.command(command_id).created)
            store.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    def p95(xs):
        return statistics.quantiles(xs, n=20)[-1]

    return {"applied_p50_ms": 1e3 * statistics.median(applied),
            "applied_p95_ms": 1e3 * p95(applied),
            "confirmed_p50_ms": 1e3 * statistics.median(confirmed),
            "confirmed_p95_ms": 1e3 * p95(confirmed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--commands", type=int, default=40)
    parser.add_argument("--store", metavar="URL", help="a PostgreSQL store to babysit into")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; both loops alike
    if args.rounds > 0:  # --rounds 0: the latency test alone
        t = throughput(args.rounds, args.steps, args.store)
        print(f"| loop | median steps/s |\n|---|---|\n| bare | {t['bare_steps_per_s']:.0f} |\n"
              f"| with Babysitter | {t['babysat_steps_per_s']:.0f} |\n")
        print(f"median throughput ratio (babysat / bare, {args.rounds} paired ABBA rounds of "
              f"{args.steps} steps): {t['ratio']:.3f}  → overhead "
              f"{100 * (1 - t['ratio']):.1f} % (quartiles {t['q1']:.3f} … {t['q3']:.3f})\n")
    lat = command_latency(args.commands, args.store)
    print(f"command latency over {args.commands} commands (commit → applied at a step "
          f"boundary): p50 {lat['applied_p50_ms']:.0f} ms, p95 {lat['applied_p95_ms']:.0f} ms; "
          f"(commit → confirmed in store): p50 {lat['confirmed_p50_ms']:.0f} ms, "
          f"p95 {lat['confirmed_p95_ms']:.0f} ms")


if __name__ == "__main__":
    main()
