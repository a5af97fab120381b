"""Caviar mode, measured: random search vs a grid, and Hyperband vs no pruning (issue #14).

    nice .venv/bin/python benchmarks/search.py [--seeds 5 --trials 16 --epochs 9]

Every study goes through :func:`trainer.search.search`, the path ``panda search`` takes: each
trial a babysat Panda run (SQLite, in a temporary directory), one trial at a time in this
process, so CPU time is this process's (``time.process_time``, the Babysitter's threads
included). For each seed and task the three arms run back to back, in a rotating order.

The space has two parameters, the LR (10^U(−4, 0)) and β (1 − β log-uniform in [1e-3, 1e-1]);
batch 32, hidden 64, no weight decay and a constant LR are fixed: few parameters, of which the
LR matters most, the situation of Bergstra & Bengio (2012). The seed varies the sampler's draws;
the tasks train from seed 0 (same data, same initial weights) in every study. At equal budgets:

* **random** vs **grid**: 16 trials each, the grid 4 × 4 log-spaced points (Optuna trials with
  fixed parameters); best validation loss reached, no pruning;
* **Hyperband** (Li et al. 2018; Optuna's ``HyperbandPruner``, one unit = one epoch) vs **no
  pruning**, random sampler, same seeds: best validation loss, CPU seconds, and the best
  validation loss the unpruned search had reached when it had spent as much CPU as Hyperband.

Medians over seeds. Also the study view's cost for 200 trials (records, table, three figures).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from trainer.search import SearchSpace, search
from trainer.search import study as studies

TASKS = ("quadratic", "spirals", "digits")
SPACE = SearchSpace(lr=(1e-4, 1.0), beta=(0.9, 0.999), weight_decay=0.0, batch_size=(32,),
                    hidden=(64,), decay=("constant",))
ARMS = ("random", "grid", "hyperband")
VIEW_TRIALS = 200


def run_arm(arm: str, task: str, seed: int, trials: int, epochs: int, root: Path) -> dict:
    """One study; returns its best validation loss, CPU seconds and its trials' trajectory."""
    name = f"{task}-{arm}-{seed}"
    start = time.process_time()
    search(task=task, space=SPACE, trials=trials, epochs=epochs, seed=seed, train_seed=0,
           study=name,
           sampler="grid" if arm == "grid" else "random",
           prune="hyperband" if arm == "hyperband" else "none", runs_dir=root)
    cpu = time.process_time() - start
    study = optuna.load_study(study_name=name, storage=studies.open_storage(root, name))
    best, spent, trajectory = math.inf, 0.0, []
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += trial.user_attrs.get("cpu_s", 0.0)
        value = trial.user_attrs.get("best")
        if value is not None and math.isfinite(value):
            best = min(best, value)
        trajectory.append((spent, best))
    return {"best": best, "cpu": cpu, "trajectory": trajectory}


def best_within(trajectory: list[tuple[float, float]], budget: float) -> float:
    """The best value a search had reached once it had spent ``budget`` CPU seconds."""
    reached = [best for spent, best in trajectory if spent <= budget]
    return reached[-1] if reached else math.inf


def median(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def view_cost(root: Path, repeats: int = 5) -> dict[str, float]:
    """Milliseconds to turn a 200-trial study into the study view's records, table and three
    figures (what each ~2 s refresh of the view does, Streamlit aside)."""
    from app.study import coordinates_figure, curves_figure, loss_vs_lr_figure, table_rows

    name = "view"
    storage = studies.open_storage(root, name, create=True)
    study = optuna.create_study(study_name=name, storage=storage)
    rng = random.Random(0)
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    made = []
    for number in range(VIEW_TRIALS):
        lr = 10 ** rng.uniform(-4, 0)
        curve = {e: 1.0 / e + abs(math.log10(lr) + 2) for e in range(1, 11)}
        made.append(optuna.trial.create_trial(
            params={"lr": lr}, distributions=dist, value=min(curve.values()),
            intermediate_values=curve,
            user_attrs={"slot": f"1.{number}", "round": 1, "run": f"view-{number}",
                        "best": min(curve.values()), "epoch": 10, "outcome": "complete",
                        "settings": {"lr": lr, "momentum": 0.9, "weight_decay": 0.0,
                                     "batch_size": 32, "hidden": 64, "decay": "constant"}}))
    study.add_trials(made)
    load_ms, draw_ms = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = optuna.load_study(study_name=name, storage=studies.open_storage(
            root, name, writer=False))
        records = studies.trial_records(loaded.get_trials(deepcopy=False))
        middle = time.perf_counter()
        table_rows(records)
        for figure in (loss_vs_lr_figure(records), coordinates_figure(records, ["lr"]),
                       curves_figure(records, 0)):
            figure.to_json()
        load_ms.append((middle - start) * 1000)
        draw_ms.append((time.perf_counter() - middle) * 1000)
    return {"load_ms": statistics.median(load_ms), "draw_ms": statistics.median(draw_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16, help="a square: the grid is k × k")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[tuple[str, str], list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="panda-search-bench-") as tmp:
        root = Path(tmp) / "runs"
        for seed in range(args.seeds):
            for task in args.tasks:
                shift = (seed + args.tasks.index(task)) % len(ARMS)
                for arm in ARMS[shift:] + ARMS[:shift]:  # rotating order: ABC, BCA, CAB
                    outcome = run_arm(arm, task, seed, args.trials, args.epochs, root)
                    results.setdefault((task, arm), []).append(outcome)
                    print(f"seed {seed} {task:<9} {arm:<9} best {outcome['best']:.4g} "
                          f"cpu {outcome['cpu']:.1f} s", flush=True)
        view = view_cost(Path(tmp) / "view")
    print(f"\n{args.seeds} seeds, {args.trials} trials × up to {args.epochs} epochs per "
          f"study, wall {time.perf_counter() - started:.0f} s; medians over seeds\n")
    print("| task | random: best val loss | grid 4×4: best val loss | random wins (seeds) |"
          " Hyperband: best val loss, CPU s | no pruning: best val loss, CPU s |"
          " no pruning at Hyperband's CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks:
        rnd, grid, hb = (results[(task, arm)] for arm in ARMS)
        wins = sum(r["best"] < g["best"] for r, g in zip(rnd, grid))
        at_budget = [best_within(r["trajectory"], h["trajectory"][-1][0])
                     for r, h in zip(rnd, hb)]
        print(f"| {task} | {median(r['best'] for r in rnd):.4g} | "
              f"{median(g['best'] for g in grid):.4g} | {wins}/{len(rnd)} | "
              f"{median(h['best'] for h in hb):.4g}, {median(h['cpu'] for h in hb):.1f} | "
              f"{median(r['best'] for r in rnd):.4g}, {median(r['cpu'] for r in rnd):.1f} | "
              f"{median(at_budget):.4g} |")
    print(f"\nstudy view, {VIEW_TRIALS} trials: load + records {view['load_ms']:.0f} ms, "
          f"table + three figures {view['draw_ms']:.0f} ms (medians of 5)")


if __name__ == "__main__":
    main()
