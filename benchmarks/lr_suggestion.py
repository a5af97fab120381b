"""Benchmark: is training at an LR range test's suggestion any good? (README, "LR suggestions")

Not a test. Two sub-commands:

    .venv/bin/python benchmarks/lr_suggestion.py quality --cache lr_suggestion.json   # the table
    .venv/bin/python benchmarks/lr_suggestion.py timing    # suggestion probes vs refinement

**quality**: for each built-in task (digits, spirals, quadratic, charlm), SGD with momentum 0.9
and AdamW (the task's ``panda train`` defaults otherwise: batch 32, quadratic full-batch like
``panda lr-find --task quadratic``; weight decay 0 for SGD, the task's own for AdamW) and each
seed: run ``lr_find`` from the initial weights exactly as ``panda lr-find --task`` does
(``purpose="start"``), then train a fixed budget at a constant LR from the same initial weights
at every rule's LR and at every LR of a dense log grid (4 per decade; the oracle is its best),
and compare final validation losses (quadratic has no held-out split: its training loss).
Each loss is the mean over a few batch orders (``ORDERS``; order 0 is ``panda train``'s own),
so that the grid's best is the best LR and not the luckiest shuffle. Budgets are small so the
table runs in about 80 minutes on two busy cores (most of it charlm): 400 steps for the MLP tasks,
300 for quadratic, 150 for charlm. A cell is the median over seeds of ``loss at the rule's LR /
the oracle's loss`` (1.00 = as good as the grid's best; below 1 when a rule's LR falls between
two grid points and beats both), with the worst seed in parentheses; "–" when the rule gave no
LR (no stability limit found).

The rules, all on the same range test (Panda's: ``measure="train"``, 100 steps, 1e-7 … 10):

* Panda now (``suggested_lr``) and Panda before this benchmark (steepest descent capped at
  ``max_stable_lr / 3``: ``finder.curve_suggestion``);
* the best of Panda's suggestion probes ÷ 1, ÷ 1.5 and ÷ 2 (the probe itself, without the
  interpolation, the fallback and the cap: why Panda divides by 2, and what interpolating adds);
* fastai's ``valley``, ``steep`` and ``minimum`` (÷ 10) on the smoothed curve trimmed as
  ``Learner.lr_find`` trims it (``num_it // 10`` points from the start, 5 from the end, up to the
  first NaN); fastai/fastai ``fastai/callback/schedule.py``;
* torch-lr-finder's steepest gradient: its own smoothing of the raw losses (``smooth_f=0.05``,
  no bias correction), ``skip_start=10``, ``skip_end=5``, ``np.gradient`` per step;
  davidtvs/pytorch-lr-finder ``torch_lr_finder/lr_finder.py`` (``LRFinder.plot``);
* fractions of the refined ``max_stable_lr``: 1/3 (Smith 2017, §3.3) and 1/10.

Validation losses are deterministic for a seed and order (one thread), so machine load does not
move them; ``--cache FILE`` keeps every final loss and range test, so an interrupted run
continues where it stopped, and a changed rule trains only at its new LRs.

**timing**: the suggestion probes ("start" and "continue") against the refinement they follow,
from one ramp per task (its ``panda train`` optimizer), the order rotated every round, medians
of ``--rounds``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from trainer.config import TASK_DEFAULTS, TrainConfig, config_values
from trainer.lr_range.finder import (
    PROBE_STEPS,
    _attach_suggestion,
    _refine,
    _Session,
    _suggestion_probes,
    curve_suggestion,
)
from trainer.lr_range.job import _measurement_set, check_options, lr_find_for_task
from trainer.lr_range.results import LRFindResult
from trainer.lr_range.suggestions import probe_best
from trainer.runner import build

TASKS = ("digits", "spirals", "quadratic", "charlm")
OPTIMIZERS = ("sgd", "adamw")
BUDGET = {"digits": 400, "spirals": 400, "quadratic": 300, "charlm": 150}
SEEDS = {"digits": 9, "spirals": 9, "quadratic": 9, "charlm": 3}
# Batch orders per LR: a loss is the mean over them. On spirals one order's loss after 400 steps
# moves ±20 % with the order alone (seed 5, LR 0.1: 0.28 to 0.41), so the best of a grid of single
# runs is mostly the luckiest order, not the best LR (the winner's curse of a minimum over 17
# noisy points). The mean of 3 orders still left it optimistic there: Panda's rule measured 1.12×
# the grid's best with 3 orders and 1.04× with 9, at the same LRs (README, "LR suggestions"), so
# spirals takes 9 (√3 less spread again). digits' spread is a few %: 3. charlm's moves ±2.5 %
# (seed 0, AdamW at 3.2e-3: 2.39 to 2.52) and costs 20× an MLP's: 2 orders. quadratic trains on
# the full batch: every order is the same.
ORDERS = {"digits": 3, "spirals": 9, "quadratic": 1, "charlm": 2}
ORDER_STRIDE = 1000
PER_DECADE = 4
# Grid (log10 of the lowest and highest LR): wide enough that no oracle sits on an edge (the
# table says so if one does). charlm's is a decade shorter: its steps cost ~50× an MLP's.
GRID = {"sgd": (-3.0, 1.0), "adamw": (-4.0, 0.0)}
CHARLM_GRID = {"sgd": (-3.0, 0.0), "adamw": (-4.0, -1.0)}
FASTAI_SKIP_END = 5           # Learner.lr_find: lrs[num_it//10:-5]
TLF_SMOOTH, TLF_SKIP_START, TLF_SKIP_END = 0.05, 10, 5   # torch-lr-finder's defaults
logger = logging.getLogger("lr_suggestion")
Rule = Callable[[Sequence[float], Sequence[float]], tuple[float | None, int | None]]


# --- the reference rules, faithful to their sources -----------------------------------------------

def fastai_valley(lrs: Sequence[float], losses: Sequence[float]):
    """fastai's ``valley``: the longest decreasing subsequence of the (trimmed, smoothed) losses,
    and the point a half of the way along it (``int(len/3) + int(len/6)`` past its start)."""
    n = len(losses)
    if n == 0:
        return None, None
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


def fastai_steep(lrs: Sequence[float], losses: Sequence[float]):
    """fastai's ``steep``: the most negative forward difference of loss against log LR."""
    if len(lrs) < 2:
        return None, None
    x, y = np.log(np.asarray(lrs)), np.asarray(losses)
    k = int(np.argmin((y[1:] - y[:-1]) / (x[1:] - x[:-1])))
    return float(lrs[k]), k


def fastai_minimum(lrs: Sequence[float], losses: Sequence[float]):
    """fastai's ``minimum``: a tenth of the LR of the lowest loss."""
    if len(lrs) == 0:
        return None, None
    k = int(np.argmin(losses))
    return float(lrs[k]) / 10, k


def fastai_curve(result: LRFindResult, num_it: int) -> tuple[list[float], list[float]]:
    """The curve fastai's rules see: smoothed losses, ``num_it // 10`` points trimmed from the
    start and 5 from the end, cut at the first NaN (``Learner.lr_find``)."""
    lrs = result.lrs[num_it // 10:-FASTAI_SKIP_END]
    losses = result.smoothed_losses[num_it // 10:-FASTAI_SKIP_END]
    cut = next((i for i, v in enumerate(losses) if math.isnan(v)), len(losses))
    return lrs[:cut], losses[:cut]


def tlf_steepest(lrs: Sequence[float], losses: Sequence[float]):
    """torch-lr-finder's suggestion (``LRFinder.plot``): its EMA of the raw losses
    (``smooth_f * loss + (1 - smooth_f) * previous``, the first raw), trimmed by ``skip_start``
    and ``skip_end``, and the minimum of ``np.gradient`` per step."""
    smoothed: list[float] = []
    for i, loss in enumerate(losses):
        smoothed.append(loss if i == 0 else TLF_SMOOTH * loss + (1 - TLF_SMOOTH) * smoothed[-1])
    lrs, smoothed = lrs[TLF_SKIP_START:-TLF_SKIP_END], smoothed[TLF_SKIP_START:-TLF_SKIP_END]
    if len(smoothed) < 2:
        return None, None
    k = int(np.argmin(np.gradient(np.asarray(smoothed))))
    return float(lrs[k]), k + TLF_SKIP_START


def rule_lrs(result: LRFindResult, num_it: int) -> dict[str, float | None]:
    """Every rule's LR on one range test (see the module docstring)."""
    curve = fastai_curve(result, num_it)
    probes = [p for p in result.suggestion_probes if math.isfinite(p.final_loss)]
    best = probe_best([p.lr for p in probes], [p.final_loss for p in probes])[0] \
        if probes else None
    limit = result.max_stable_lr
    return {
        "Panda now": result.suggested_lr,
        "Panda before": curve_suggestion(result).lr,
        "probes ÷1": best,
        "probes ÷1.5": best / 1.5 if best else None,
        "probes ÷2": best / 2 if best else None,
        "fastai valley": fastai_valley(*curve)[0],
        "fastai steep": fastai_steep(*curve)[0],
        "fastai minimum/10": fastai_minimum(*curve)[0],
        "torch-lr-finder": tlf_steepest(result.lrs, result.losses)[0],
        "max_stable/3": limit / 3 if limit else None,
        "max_stable/10": limit / 10 if limit else None,
    }


# --- training at one LR ---------------------------------------------------------------------------

def _config(task: str, optimizer: str, seed: int, lr: float | None = None) -> TrainConfig:
    """``panda train``'s config for the task (its LR unless ``lr``), with ``optimizer``."""
    decay = None if optimizer == "adamw" else 0.0   # AdamW: the task's own (charlm 0.1)
    return TrainConfig(**config_values(task, optimizer=optimizer, seed=seed, lr=lr,
                                       weight_decay=decay)).validate()


def _batch_size(task_name: str, task, cfg: TrainConfig) -> int:
    return task.num_train if task_name == "quadratic" else cfg.batch_size


def order_seed(seed: int, order: int) -> int:
    """The batch order ``order`` of a seed: 0 is ``panda train``'s own (the seed), the others
    shuffle the same data differently from the same initial weights."""
    return seed + ORDER_STRIDE * order


def final_loss(task_name: str, optimizer: str, seed: int, lr: float, steps: int,
               order: int = 0) -> float:
    """Validation loss after ``steps`` steps at a constant ``lr`` from the seed's initial
    weights, on batch order ``order`` (inf when training blew up)."""
    cfg = _config(task_name, optimizer, seed, lr)
    task, opt = build(cfg)
    torch.set_num_threads(1)   # build() applies a task's own thread count; the table uses one
    size, done, epoch = _batch_size(task_name, task, cfg), 0, 0
    while done < steps:
        for x, y in task.batches(size, seed=order_seed(seed, order), epoch=epoch):
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(task.model(x), y)
            if not torch.isfinite(loss):
                return math.inf
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    if task.val_x is None:
        with torch.no_grad():
            value = float(task.loss_fn(task.model(task.train_x), task.train_y))
    else:
        value = task.evaluate()["loss"]
    return value if math.isfinite(value) else math.inf


def grid(task: str, optimizer: str) -> list[float]:
    low, high = (CHARLM_GRID if task == "charlm" else GRID)[optimizer]
    return [10 ** (low + k / PER_DECADE) for k in range(round((high - low) * PER_DECADE) + 1)]


class Cache:
    """Finished work, kept in a JSON file so that a run can be interrupted and a rule changed
    without training again: every (task, optimizer, seed, order, steps, LR)'s final loss, and
    every range test, keyed by the source of the code that produced it (:func:`_fingerprint`).
    The suggestion is recomputed from a cached test's curve and probes with the current rules
    (``finder._attach_suggestion``), so changing ``suggestions.py`` costs only the new LRs."""

    def __init__(self, path: Path | None):
        self.path = path
        data = json.loads(path.read_text()) if path and path.exists() else {}
        self.losses: dict[str, float] = data.get("losses", {})
        self.tests: dict[str, dict] = data.get("lr_find", {})

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps({"losses": self.losses, "lr_find": self.tests}))

    def loss(self, task: str, optimizer: str, seed: int, lr: float, order: int) -> float:
        key = f"{task}|{optimizer}|{seed}|{order}|{BUDGET[task]}|{lr!r}"
        if key not in self.losses:
            self.losses[key] = final_loss(task, optimizer, seed, lr, BUDGET[task], order)
            self.save()
        return self.losses[key]

    def range_test(self, task: str, optimizer: str, seed: int) -> tuple[LRFindResult, float]:
        """``lr_find`` from the seed's initial weights as ``panda lr-find --task`` runs it,
        and its seconds (cached: those of the run that made it)."""
        key = f"{task}|{optimizer}|{seed}|{_fingerprint()}"
        if key not in self.tests:
            started = time.perf_counter()
            decay = None if optimizer == "adamw" else 0.0
            result = lr_find_for_task(task, seed=seed, optimizer=optimizer, weight_decay=decay)
            torch.set_num_threads(1)
            self.tests[key] = {"result": result.to_dict(),
                               "seconds": round(time.perf_counter() - started, 1)}
            self.save()
        result = LRFindResult.from_dict(self.tests[key]["result"])
        _attach_suggestion(result, result.suggestion_probes)   # the rules as they are now
        return result, self.tests[key]["seconds"]


def _fingerprint() -> str:
    """What a cached range test depends on besides the rules: the finder, the job's options
    and measurement set, the tasks."""
    import trainer.charlm
    import trainer.lr_range.finder
    import trainer.lr_range.job
    import trainer.tasks

    digest = hashlib.sha1()
    for module in (trainer.lr_range.finder, trainer.lr_range.job, trainer.tasks, trainer.charlm):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def measure(task: str, optimizer: str, seed: int, orders: int, cache: Cache) -> dict:
    """One (task, optimizer, seed): the range test, every rule's LR, and the mean final loss
    over ``orders`` batch orders at each of them and at every LR of the grid."""
    started = time.perf_counter()
    result, lr_find_s = cache.range_test(task, optimizer, seed)
    rules = rule_lrs(result, check_options()["num_iter"])

    def loss_at(lr: float) -> float:
        return statistics.fmean(cache.loss(task, optimizer, seed, lr, k) for k in range(orders))

    return {"task": task, "optimizer": optimizer, "seed": seed, "budget": BUDGET[task],
            "orders": orders, "lr_find_s": lr_find_s, "rule": result.suggestion_rule,
            "rules": {name: [lr, loss_at(lr) if lr else None] for name, lr in rules.items()},
            "oracle": [[lr, loss_at(lr)] for lr in grid(task, optimizer)],
            "seconds": round(time.perf_counter() - started, 1)}


# --- the table ------------------------------------------------------------------------------------

def _cell(ratios: list[float]) -> str:
    if not ratios:
        return "–"
    text = f"{statistics.median(ratios):.2f} ({max(ratios):.2f})"
    return text.replace("inf", "∞")


def table(records: list[dict]) -> list[str]:
    names = list(records[0]["rules"])
    rows = ["| task | optimizer | steps | seeds × orders | oracle LR | Panda now's LR | " +
            " | ".join(names) + " |", "|---" * (6 + len(names)) + "|"]
    verdicts = []
    for task in TASKS:
        for optimizer in OPTIMIZERS:
            mine = [r for r in records if r["task"] == task and r["optimizer"] == optimizer]
            if not mine:
                continue
            ratios: dict[str, list[float]] = {name: [] for name in names}
            oracle_lrs, edge = [], False
            for r in mine:
                lrs, losses = zip(*r["oracle"])
                best = min(losses)
                k = int(np.argmin(losses))
                oracle_lrs.append(lrs[k])
                edge |= k in (0, len(lrs) - 1)
                for name, (_, loss) in r["rules"].items():
                    if loss is not None:
                        ratios[name].append(loss / best)
            now = [r["rules"]["Panda now"][0] for r in mine if r["rules"]["Panda now"][0]]
            cells = [_cell(ratios[name]) for name in names]
            rows.append(f"| {task} | {optimizer} | {mine[0]['budget']} | "
                        f"{len(mine)} × {mine[0]['orders']} | "
                        f"{statistics.median(oracle_lrs):.2g}{' (edge!)' if edge else ''} | "
                        f"{statistics.median(now):.2g} | " + " | ".join(cells) + " |")
            medians = {n: statistics.median(v) for n, v in ratios.items() if v}
            others = min(v for n, v in medians.items()
                         if n != "Panda now" and not n.startswith("probes"))
            ours = medians["Panda now"]
            near_oracle = "within" if ours <= 1.05 else "NOT within"
            near_others = "within" if ours <= 1.05 * others else "NOT within"
            rules = statistics.multimode(r["rule"] for r in mine)
            verdicts.append(f"{task}/{optimizer}: Panda now {ours:.3f} × oracle ({near_oracle} "
                            f"5 %), best other rule {others:.3f} ({near_others} 5 % of it); "
                            f"rule mostly {'/'.join(rules)}")
    return [*rows, "", *verdicts]


def quality(args: argparse.Namespace) -> int:
    cache = Cache(Path(args.cache) if args.cache else None)
    records = []
    for task in args.tasks:
        orders = args.orders or ORDERS[task]
        for seed in range(args.seeds or SEEDS[task]):
            for optimizer in args.optimizers:
                record = measure(task, optimizer, seed, orders, cache)
                records.append(record)
                logger.info("%s %s seed %d: %.1f s (lr_find %.1f s), rule %s", task, optimizer,
                            seed, record["seconds"], record["lr_find_s"], record["rule"])
    print(f"\ntorch {torch.__version__}, 1 thread, CPU; final validation loss / the grid's best "
          f"(median over seeds, worst seed in parentheses; each loss the mean over batch "
          f"orders); grid {PER_DECADE} per decade\n")
    print("\n".join(table(records)))
    return 0


# --- timing: the suggestion probes against the refinement -----------------------------------------

def _session(task_name: str, optimizer: str, seed: int = 0):
    cfg = _config(task_name, optimizer, seed)
    task, opt = build(cfg)
    size = _batch_size(task_name, task, cfg)
    opts = check_options(purpose="start")
    return _Session(task.model, opt, task.loss_fn,
                    lambda: task.batches(size, seed=seed, epoch=0),
                    _measurement_set(task, opts, seed), 16)


def timing(args: argparse.Namespace) -> int:
    """The refinement and both purposes' suggestion probes from one ramp of each task (its
    ``panda train`` optimizer), each kind timed once per round, the order rotated every round
    (round 0 untimed: warm-up); medians."""
    from trainer.lr_range.finder import _ramp

    kinds = ("refine", "start", "continue")
    rows = ["| task (optimizer) | refinement: probes, ms | start: probes, ms (÷ refinement) "
            "| continue: probes, ms (÷ refinement) |", "|---|---|---|---|"]
    for task in args.tasks:
        optimizer = TASK_DEFAULTS.get(task, {}).get("optimizer", "sgd")
        session = _session(task, optimizer)
        lr = _config(task, optimizer, 0).lr
        ramp = _ramp(session, 1e-7, 10.0, 100, 0.98, 4.0)
        upper = ramp.diverged_at if ramp.diverged_at is not None else 10.0
        refined = deepcopy(ramp)
        _refine(session, refined, upper, PROBE_STEPS)   # the limit the probes start below
        times: dict[str, list[float]] = {k: [] for k in kinds}
        counts: dict[str, int] = {}
        for round_ in range(args.rounds + 1):
            for which in kinds[round_ % 3:] + kinds[:round_ % 3]:
                target = deepcopy(ramp if which == "refine" else refined)
                target.purpose, target.current_lr = which, lr
                start = time.perf_counter()
                if which == "refine":
                    _refine(session, target, upper, PROBE_STEPS)
                    counts[which] = len(target.refine_probes)
                else:
                    counts[which] = len(_suggestion_probes(session, target, PROBE_STEPS))
                if round_:
                    times[which].append(time.perf_counter() - start)
        session.restore_rng()
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append(f"| {task} ({optimizer}) | {counts['refine']}, {ms['refine']:.0f} | " +
                    " | ".join(f"{counts[k]}, {ms[k]:.0f} ({ms[k] / ms['refine']:.2f})"
                               for k in kinds[1:]) + " |")
        logger.info("%s", rows[-1])
    print(f"\ntorch {torch.__version__}, 1 thread, CPU; {PROBE_STEPS}-step probes; median of "
          f"{args.rounds} rounds, the order rotated every round\n")
    print("\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="# %(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="final validation loss at each rule's LR vs a grid")
    q.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    q.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    q.add_argument("--seeds", type=int, help="seeds per task (default: 9; charlm 3)")
    q.add_argument("--orders", type=int, help="batch orders per LR (default: 3; spirals 9, "
                   "charlm 2, quadratic, full-batch, 1)")
    q.add_argument("--cache", help="JSON file of finished work: reused, and extended")
    t = sub.add_parser("timing", help="suggestion probes vs the refinement, interleaved")
    t.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    t.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    return quality(args) if args.command == "quality" else timing(args)


if __name__ == "__main__":
    sys.exit(main())
