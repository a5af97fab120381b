"""How much does babysitting cost? The figures of the README's benchmark section.

1. Throughput overhead, three loops side by side on the same model: bare, with
   ``Babysitter.step(loss)`` every step, and with TensorBoard's ``SummaryWriter.add_scalar``
   every step (what most people use to watch a run), in paired rounds that rotate which goes
   first, medians of the per-round ratios. Two loops: ``fast`` (a 64-128-10 MLP on one fixed
   batch of 32, about 150 µs a step on a CPU) and ``digits`` (the digits MLP 64-64-10 with its
   shuffled batches, about 400 µs a step). Goal: under 2 % on the fast loop (3 % with
   PostgreSQL). With ``--device cuda`` the same loops train on a GPU, where a logger that
   reads the loss every step (TensorBoard's ``add_scalar`` calls ``.item()``) makes the host
   wait for the device at every step, and Panda reads it once a flush, off the training thread.
2. Command latency: a real ``panda train`` subprocess, commands committed to its store the way
   ``panda set`` commits them, and the time from commit to being taken at a step boundary
   (the intervention event's wall time) and to the trainer's confirmation in the store (from
   the update that used the change).

    .venv/bin/python benchmarks/overhead.py [--loop fast|digits --rounds 31 --steps 2000]

With ``--store postgresql://…`` the babysat loop and the trainer keep the run in that
PostgreSQL database instead of a SQLite file (the other loops are the same either way). The
TensorBoard column needs ``pip install tensorboard`` (not a dependency of Panda).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from trainer import Babysitter
from trainer.store import StoreError
from trainer.store.address import store_for
from trainer.tasks import make_task

BATCH_SIZE = 32
ARRIVAL_JITTER_S = 0.2  # random wait before each command of the latency test
LOOPS = ("fast", "digits")


def _loop(task, model, optimizer, steps: int, babysitter: Babysitter | None, *,
          seed: int = 0, ready=None, log: Callable | None = None) -> float:
    """Train ``steps`` steps on ``task``'s batches; return steps per second. ``ready()`` runs just
    before the clock starts (DDP ranks use a barrier there); ``log(loss, step)`` is another
    logger's per-step call (TensorBoard's). On a GPU the clock stops once the device has done
    the work queued (the host runs ahead of it otherwise)."""
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
            if log is not None:
                log(loss, done)
            done += 1
            if done == steps:
                break
        epoch += 1
    if loss.is_cuda:
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


class FixedBatch:
    """The fast loop's task: one fixed batch, no data loading, so per-step costs show in full
    (a stand-in for a task's ``batches`` and ``loss_fn``, as ``_loop`` reads them)."""

    def __init__(self, device: str = "cpu"):
        g = torch.Generator().manual_seed(0)
        self.batch = (torch.randn(BATCH_SIZE, 64, generator=g).to(device),
                      torch.randint(0, 10, (BATCH_SIZE,), generator=g).to(device))
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator:
        return itertools.repeat(self.batch)


class OnDevice:
    """A task whose batches are moved to ``device`` as they come (the digits loop on a GPU,
    the way a data loader's batches reach one)."""

    def __init__(self, task, device: str):
        self.task, self.device, self.loss_fn = task, device, task.loss_fn

    def batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator:
        for x, y in self.task.batches(batch_size, seed=seed, epoch=epoch):
            yield x.to(self.device), y.to(self.device)


def _model(loop: str) -> torch.nn.Module:
    if loop == "digits":
        return make_task("digits", seed=0).model  # same initial weights every time
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def _tensorboard(tmp: str) -> Callable[[], object] | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return lambda: SummaryWriter(log_dir=str(Path(tmp) / f"tb-{time.time_ns()}"))


def throughput(rounds: int, steps: int, store: str | None = None, loop: str = "fast",
               warmup: int = 0, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Rounds of the three loops, rotating which goes first, so a machine that speeds up or
    slows down during the run favours none of them. Returns per loop: median steps/s, and for
    Panda and TensorBoard the median of the per-round ratios to bare, with quartiles."""
    if loop == "fast":
        task = FixedBatch(device)
    else:
        task = make_task("digits", seed=0)
        task = task if device == "cpu" else OnDevice(task, device)
    results: dict[str, list[float]] = {"bare": [], "panda": [], "tensorboard": []}
    # CPU µs a step, every thread of this process (the loggers' background threads included):
    # what babysitting costs in work, which a loaded machine inflates far less than wall time.
    cpu: dict[str, list[float]] = {"bare": [], "panda": [], "tensorboard": []}

    def run(kind: str, i: int, tmp: str, writer_factory) -> None:
        model = _model(loop).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train(bs=None, log=None) -> float:
            if warmup:  # same for every loop: what a long run pays every step, not its start
                _loop(task, model, opt, warmup, bs, log=log)
            start = time.process_time()
            rate = _loop(task, model, opt, steps, bs, log=log)
            cpu[kind].append(1e6 * (time.process_time() - start) / steps)
            return rate
        if kind == "bare":
            results["bare"].append(train())
        elif kind == "panda":
            with Babysitter(opt, Path(tmp) / f"r{i}-{time.time_ns()}", model=model,
                            store=store) as bs:
                results["panda"].append(train(bs=bs))
        else:
            writer = writer_factory()
            try:
                results["tensorboard"].append(
                    train(log=lambda loss, step: writer.add_scalar("loss", loss, step)))
            finally:
                writer.close()

    with tempfile.TemporaryDirectory() as tmp:
        writer_factory = _tensorboard(tmp)
        kinds = ["bare", "panda"] + (["tensorboard"] if writer_factory else [])
        for i in range(rounds):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for kind in (order if i % 2 == 0 else order[::-1]):
                run(kind, i, tmp, writer_factory)
    out = {}
    for kind, rates in results.items():
        if not rates:
            continue
        entry = {"steps_per_s": statistics.median(rates),
                 "cpu_us": statistics.median(cpu[kind])}
        if kind != "bare":
            ratios = sorted(r / b for b, r in zip(results["bare"], rates))
            quartiles = statistics.quantiles(ratios, n=4)
            entry.update(ratio=statistics.median(ratios), q1=quartiles[0], q3=quartiles[2],
                         cpu_ratio=statistics.median(c / b for b, c in zip(cpu["bare"],
                                                                             cpu[kind])))
        out[kind] = entry
    return out


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
    parser.add_argument("--loop", choices=LOOPS, default="fast")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                        help="steps every loop runs, untimed, before its timed steps")
    parser.add_argument("--commands", type=int, default=40)
    parser.add_argument("--store", metavar="URL", help="a PostgreSQL store to babysit into")
    parser.add_argument("--device", default="cpu", help="where the loops train (e.g. cuda)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; every loop alike
    if args.rounds > 0:  # --rounds 0: the latency test alone
        t = throughput(args.rounds, args.steps, args.store, args.loop, args.warmup,
                       args.device)
        print(f"{args.loop} loop on {args.device}, {args.rounds} rounds of {args.steps} steps, "
              f"{'PostgreSQL' if args.store else 'SQLite'}:")
        print("| loop | median steps/s | median ratio to bare (quartiles) | overhead | "
              "CPU µs a step (all threads) | CPU ratio to bare |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind, row in t.items():
            if kind == "bare":
                print(f"| bare | {row['steps_per_s']:.0f} | 1 | – | {row['cpu_us']:.1f} | 1 |")
            else:
                print(f"| {kind} | {row['steps_per_s']:.0f} | {row['ratio']:.3f} "
                      f"({row['q1']:.3f} … {row['q3']:.3f}) | "
                      f"{100 * (1 - row['ratio']):.1f} % | {row['cpu_us']:.1f} | "
                      f"{row['cpu_ratio']:.3f} |")
        print()
    if args.commands > 0:
        lat = command_latency(args.commands, args.store)
        print(f"command latency over {args.commands} commands (commit → taken at a step "
              f"boundary): p50 {lat['applied_p50_ms']:.0f} ms, p95 "
              f"{lat['applied_p95_ms']:.0f} ms; (commit → confirmed in the store, from the "
              f"update that used it): p50 {lat['confirmed_p50_ms']:.0f} ms, "
              f"p95 {lat['confirmed_p95_ms']:.0f} ms")


if __name__ == "__main__":
    main()
